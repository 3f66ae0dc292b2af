"""A LangChain agent that is told facts over a long conversation, then asked about them later.

    .venv/bin/python examples/langchain_agent.py [--keep 4] [--max-new-tokens 24]

The agent (``langchain.agents.create_agent``) runs ChatD2L, the local default model, with
D2LCompactionMiddleware: whenever more than ``--keep`` messages (+ a block of 2) pile up, the old
turns are compacted into the session's LoRA adapter by one hypernetwork pass (no LLM call) and
leave the prompt. Later questions are answered with that adapter applied and a short prompt.

For every model call the script prints the prompt tokens actually sent and what keeping the whole
history would have cost, then answers the same questions a second way, with the whole conversation
in the prompt, as the quality reference. Runs offline on the defaults. With a base model that has
no trained hypernetwork the adapters are zero: the facts that left the prompt are then simply gone,
and the script says so instead of hiding it.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from d2l_memory import MemoryEngine, MemoryProvider, Scope
from d2l_memory.storage import open_store
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver

from langchain_d2l import ChatD2L, D2LCompactionMiddleware

SYSTEM_PROMPT = "You are a helpful assistant. Answer in one short sentence."
FACTS = (
    "Hi! My name is Orvane Tessaly.",
    "I live in Brakmoor, a small harbour town.",
    "My badge number at work is 4821.",
    "I work for Quillfen Logistics as a dispatcher.",
    "My sister Mirel lives in Dastow and works as a pharmacist.",
    "My favourite colour is teal.",
    "I play the cello in a string quartet on Thursdays.",
    "Our warehouse tool sync_ledger retries 3 times by default.",
)
QUESTIONS = (
    ("Where do I live?", "brakmoor"),
    ("What is my badge number?", "4821"),
    ("Which company do I work for?", "quillfen"),
    ("Which instrument do I play?", "cello"),
)
QUESTION_TEXTS = tuple(question for question, _ in QUESTIONS)


@dataclass
class Turn:
    said: str
    answer: str
    prompt_tokens: int
    """Prompt tokens the agent's model call used (compacted history)."""
    full_prompt_tokens: int
    """Prompt tokens the same call would use with the whole conversation in the prompt."""


@dataclass
class Report:
    turns: list[Turn] = field(default_factory=list)
    reference: list[str] = field(default_factory=list)
    """Answers to QUESTIONS with the whole conversation in the prompt."""
    compacted_messages: int = 0
    hypernet_trained: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.turns)

    @property
    def full_prompt_tokens(self) -> int:
        return sum(t.full_prompt_tokens for t in self.turns)


def run(
    llm: ChatD2L,
    provider: MemoryProvider,
    *,
    facts: tuple[str, ...] = FACTS,
    questions: tuple[str, ...] = QUESTION_TEXTS,
    keep: int = 4,
    show: bool = True,
) -> Report:
    """Tell the agent ``facts``, ask ``questions``, and measure the prompt of every model call."""
    engine = provider.engine
    scope = Scope(tenant="demo", user="orvane", session=uuid.uuid4().hex[:12])
    middleware = D2LCompactionMiddleware(provider, scope, keep_messages=keep, compact_block=2)
    agent = create_agent(llm, system_prompt=SYSTEM_PROMPT, middleware=[middleware], checkpointer=InMemorySaver())
    config: RunnableConfig = {"configurable": {"thread_id": scope.session}}
    everything: list[BaseMessage] = [SystemMessage(SYSTEM_PROMPT)]  # what a no-compaction agent would send
    report = Report(hypernet_trained=engine.hypernet_trained)

    for text in (*facts, *questions):
        full_prompt = engine.count_prompt_tokens(
            text, history=[{"role": _role(m), "content": str(m.content)} for m in everything])
        start = time.perf_counter()
        state = agent.invoke({"messages": [HumanMessage(text)]}, config)
        reply: AIMessage = state["messages"][-1]
        assert reply.usage_metadata is not None  # ChatD2L always reports usage
        turn = Turn(text, str(reply.content), reply.usage_metadata["input_tokens"], full_prompt)
        report.turns.append(turn)
        everything += [HumanMessage(text), AIMessage(turn.answer)]
        if show:
            seconds = time.perf_counter() - start
            print(f"  {turn.prompt_tokens:4d} vs {turn.full_prompt_tokens:4d} tokens  {seconds:5.1f} s"
                  f"  | {_short(text, 40):<40} -> {_short(turn.answer, 60)}")
    report.compacted_messages = len(provider.transcript(scope))

    # Quality reference: the same questions with the whole conversation in the prompt.
    told = everything[: 1 + 2 * len(facts)]
    report.reference = [str(llm.invoke([*told, HumanMessage(q)]).content) for q in questions]
    return report


def _role(message: BaseMessage) -> str:
    return {"system": "system", "human": "user", "ai": "assistant"}[message.type]


def _short(text: str, width: int) -> str:
    return textwrap.shorten(text.replace("\n", " "), width=width, placeholder=" ...")


def _hits(answers: list[str]) -> int:
    return sum(key in a.lower() for a, (_, key) in zip(answers, QUESTIONS, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=int, default=4, help="messages kept verbatim after each compaction")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--store", type=Path, help="memory store folder (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    root = args.store or Path(tempfile.mkdtemp(prefix="d2l-langchain-agent-"))
    print("Loading the default base model and hypernetwork (offline)...")
    engine = MemoryEngine.from_pretrained()
    provider = MemoryProvider(engine, open_store(f"sqlite:///{root / 'index.db'}", str(root / "blobs")))
    llm = ChatD2L(provider=provider, max_tokens=args.max_new_tokens)
    print(f"Memory store: {root}\n\nprompt tokens: compacted vs whole history, per model call")
    report = run(llm, provider, keep=args.keep)

    n_q = len(QUESTIONS)
    saved = 1 - report.prompt_tokens / report.full_prompt_tokens
    print(f"\n{report.compacted_messages} old messages were compacted into the session's adapter (no LLM call).")
    print(f"Prompt tokens over {len(report.turns)} model calls: {report.prompt_tokens} with compaction vs "
          f"{report.full_prompt_tokens} keeping the whole history ({saved:.0%} fewer); the last call sent "
          f"{report.turns[-1].prompt_tokens} instead of {report.turns[-1].full_prompt_tokens}.")
    answers = [t.answer for t in report.turns[-n_q:]]
    print(f"\nLater questions answered with the fact:  compacted memory {_hits(answers)}/{n_q}   "
          f"whole history in prompt {_hits(report.reference)}/{n_q}")
    for (question, _), mine, ref in zip(QUESTIONS, answers, report.reference, strict=True):
        print(f"  Q: {question}\n     memory:  {_short(mine, 80)}\n     history: {_short(ref, 80)}")
    if not report.hypernet_trained:
        print("\nNOTE: no trained hypernetwork for this base model, so the adapters are zero: facts that were "
              "compacted out of the prompt are not recalled, and the 'memory' answers above come from the base "
              "model and the recent window alone. The token savings are real; the recall is not.")


if __name__ == "__main__":
    main()
