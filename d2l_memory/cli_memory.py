"""Memory commands of the ``d2l-memory`` CLI: add, ask, chat, list, show, delete, drop-chunks, export, expire.

Exit codes: 0 success, 1 unexpected failure, 2 bad input (unreadable or binary file, invalid scope
or id, incompatible adapter), 3 unknown memory id.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from d2l_store import AdapterRecord, MemoryKind, Scope
from tqdm.auto import tqdm

from d2l_memory.config import ChunkConfig
from d2l_memory.storage import open_store

SCOPE_HELP = "tenant/user/agent/session; trailing parts may be left out (default: the empty scope)"


def parse_scope(text: str) -> Scope:
    parts = text.split("/") if text else []
    if len(parts) > 4:
        raise argparse.ArgumentTypeError(f"scope {text!r} has more than 4 parts ({SCOPE_HELP})")
    try:
        return Scope(**dict(zip(("tenant", "user", "agent", "session"), parts, strict=False)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def format_scope(scope: Scope) -> str:
    return "/".join((scope.tenant, scope.user, scope.agent, scope.session)).rstrip("/")


def _common(p: argparse.ArgumentParser, *, scope: bool = True, model: bool = True) -> None:
    if scope:
        p.add_argument("--scope", default="", type=parse_scope, help=SCOPE_HELP)
    p.add_argument("--store", help="SQLAlchemy index URL (default: $D2L_MEMORY_STORE or SQLite in the d2l-memory home)")
    p.add_argument("--blobs", help="blob folder or fsspec URL (default: $D2L_MEMORY_BLOBS or the d2l-memory home)")
    if model:
        p.add_argument("--base-model", default=None,
                       help="base model name, folder or hub id (default: the built-in one)")
        p.add_argument("--hypernet", default=None, help="hypernetwork checkpoint folder (default: the shipped one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_memory_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("add", help="internalize documents into stored memories; prints their ids")
    p.add_argument("files", nargs="+", help="text or Markdown files")
    p.add_argument("--kind", default="document", choices=[MemoryKind.DOCUMENT.value, MemoryKind.TOOL_DOC.value])
    p.add_argument("--tag", action="append", default=[], help="tag to attach (repeatable)")
    _common(p)
    p.set_defaults(handler=run_add)

    p = sub.add_parser("ask", help="answer a question with the scope's memories applied")
    p.add_argument("question")
    p.add_argument("--show-recall", action="store_true", help="print which memories and chunks were applied, and why")
    p.add_argument("--hybrid", action="store_true", help="also put the best-matching source snippets in the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--memory", action="append", help="apply exactly these memory ids (repeatable)")
    _common(p)
    p.set_defaults(handler=run_ask)

    p = sub.add_parser("chat", help="interactive chat; old turns are compacted into memory")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--keep", type=int, default=8, help="messages kept verbatim in the prompt")
    _common(p)
    p.set_defaults(handler=run_chat)

    p = sub.add_parser("list", help="list memories in a scope (newest first)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--kind", choices=[k.value for k in MemoryKind])
    _common(p, model=False)
    p.set_defaults(handler=run_list)

    p = sub.add_parser("show", help="show one memory's record")
    p.add_argument("id")
    _common(p, model=False)
    p.set_defaults(handler=run_show)

    p = sub.add_parser("delete", help="delete one memory")
    p.add_argument("id")
    _common(p, model=False)
    p.set_defaults(handler=run_delete)

    p = sub.add_parser("drop-chunks", help="forget some chunks of a memory (a new version without them)")
    p.add_argument("id")
    p.add_argument("chunks", nargs="+", type=int, help="chunk indices to drop")
    _common(p)
    p.set_defaults(handler=run_drop_chunks)

    p = sub.add_parser("export", help="export a memory as a PEFT LoRA folder (peft, vLLM, LoRAX, SGLang)")
    p.add_argument("id")
    p.add_argument("--format", choices=["peft"], default="peft")
    p.add_argument("out_dir")
    p.add_argument("--pad-rank-to-vllm", action="store_true", help="zero-pad the rank to one vLLM accepts")
    _common(p, model=False)
    p.set_defaults(handler=run_export)

    p = sub.add_parser("expire", help="delete expired memories and collect unreferenced blobs")
    _common(p, scope=False, model=False)
    p.set_defaults(handler=run_expire)


# ---- helpers -----------------------------------------------------------------------------------


def load_engine(args: argparse.Namespace, chunking: ChunkConfig = ChunkConfig()):  # noqa: ANN201 - MemoryEngine
    """The engine of ``--base-model`` (default: the built-in one) and ``--hypernet``; imported lazily (torch)."""
    from d2l_memory.engine import MemoryEngine

    chosen_base = {"base_model": args.base_model} if args.base_model else {}
    return MemoryEngine.from_pretrained(**chosen_base, hypernet=args.hypernet, chunking=chunking)


def _provider(args: argparse.Namespace, **config: Any):  # noqa: ANN202 - MemoryProvider, imported lazily
    from d2l_memory.provider import MemoryProvider, ProviderConfig

    return MemoryProvider(load_engine(args), open_store(args.store, args.blobs), ProviderConfig(**config))


def _record_json(rec: AdapterRecord, with_text: bool = False) -> dict[str, Any]:
    out = {
        "id": rec.id, "scope": format_scope(rec.scope), "kind": rec.kind.value, "name": rec.metadata.get("name"),
        "chunks": rec.n_chunks, "rank": rec.rank, "bytes": rec.nbytes, "version": rec.version,
        "supersedes": rec.supersedes, "tags": [t for t in rec.tags if not t.startswith("name:")],
        "created_at": rec.created_at.isoformat(), "expires_at": rec.expires_at.isoformat() if rec.expires_at else None,
        "base_model": rec.base_model, "hypernet": rec.hypernet, "chunk_spans": [list(s) for s in rec.chunk_spans],
    }  # fmt: skip
    if with_text:
        out["source_text"] = rec.source_text
    return out


def _emit(args: argparse.Namespace, payload: Any, human: Callable[[], None]) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        human()


# ---- handlers ------------------------------------------------------------------------------------


def run_add(args: argparse.Namespace) -> int:
    provider = _provider(args)
    results = []
    for path in tqdm(args.files, desc="adding", unit="file", disable=len(args.files) < 2 or args.json):
        result = provider.add_file(path, args.scope, kind=MemoryKind(args.kind), tags=args.tag)
        results.append({"file": path, "status": result.status, **_record_json(result.record)})

    def human() -> None:
        for r in results:
            print(f"{r['id']}  {r['status']:<10} {r['chunks']:3d} chunks  {r['file']}")

    _emit(args, results, human)
    return 0


def run_ask(args: argparse.Namespace) -> int:
    provider = _provider(args)
    kwargs = {"hybrid": args.hybrid, "memory_ids": args.memory, "max_new_tokens": args.max_new_tokens}
    if args.json:
        answer = provider.answer(args.question, args.scope, **kwargs)
        payload = {"answer": answer.text, "prompt_tokens": answer.prompt_tokens,
                   "completion_tokens": answer.completion_tokens, "recall": answer.recall.describe()}
        _emit(args, payload, lambda: None)
        return 0
    recall, pieces = provider.stream(args.question, args.scope, **kwargs)
    if args.show_recall:
        _print_recall(recall.describe())
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _print_recall(described: dict[str, Any]) -> None:
    print(f"[recall] total rank {described['rank']}", file=sys.stderr)
    for m in described["memories"]:
        print(f"[recall] {m['id']} chunks {m['chunks']}: {m['reason']}", file=sys.stderr)
    for s in described["skipped"]:
        print(f"[recall] skipped {s['id']}: {s['reason']}", file=sys.stderr)


def run_chat(args: argparse.Namespace) -> int:
    provider = _provider(args, verbatim_messages=args.keep)
    print("d2l-memory chat: /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if not line:
            continue
        recall, pieces = provider.stream(line, args.scope, max_new_tokens=args.max_new_tokens)
        sys.stdout.write("bot> ")
        reply = ""
        for piece in pieces:
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        turn = [{"role": "user", "content": line}, {"role": "assistant", "content": reply.strip()}]
        done = provider.append_messages(args.scope, turn)
        if done is not None:
            print(f"[memory] compacted {done.messages} messages into {done.new_chunks} new chunk(s); "
                  f"session memory {done.record.id} now has {done.record.n_chunks}", file=sys.stderr)


def run_list(args: argparse.Namespace) -> int:
    store = open_store(args.store, args.blobs)
    records = store.list(args.scope, kind=args.kind, limit=args.limit)
    rows = [_record_json(r) for r in records]

    def human() -> None:
        for r in rows:
            print(f"{r['id']}  {r['kind']:<17} {r['chunks']:4d} chunks  v{r['version']}  "
                  f"{r['scope'] or '-':<24} {r['name'] or ''}")

    _emit(args, rows, human)
    return 0


def run_show(args: argparse.Namespace) -> int:
    rec = open_store(args.store, args.blobs).get_record(args.id, scope=args.scope if args.scope != Scope() else None)
    payload = _record_json(rec, with_text=True)

    def human() -> None:
        for key, value in payload.items():
            if key != "source_text":
                print(f"{key:>12}: {value}")
        text = rec.source_text or ""
        print(f"{'source':>12}: {text[:500]}{' ...' if len(text) > 500 else ''}")

    _emit(args, payload, human)
    return 0


def run_delete(args: argparse.Namespace) -> int:
    open_store(args.store, args.blobs).delete(args.id, scope=args.scope if args.scope != Scope() else None)
    _emit(args, {"deleted": args.id}, lambda: print(f"deleted {args.id}"))
    return 0


def run_drop_chunks(args: argparse.Namespace) -> int:
    provider = _provider(args)
    record = provider.store.get_record(args.id)
    rec = provider.forget_chunks(args.id, args.chunks, record.scope if args.scope == Scope() else args.scope)
    _emit(args, _record_json(rec), lambda: print(f"{rec.id}  now {rec.n_chunks} chunks (was {args.id})"))
    return 0


def run_export(args: argparse.Namespace) -> int:
    scope = args.scope if args.scope != Scope() else None
    out = open_store(args.store, args.blobs).export_peft(
        args.id, args.out_dir, pad_rank_to_vllm=args.pad_rank_to_vllm, scope=scope
    )
    _emit(args, {"id": args.id, "path": str(out)}, lambda: print(out))
    return 0


def run_expire(args: argparse.Namespace) -> int:
    store = open_store(args.store, args.blobs)
    removed = store.expire()
    report = store.gc_blobs()
    payload = {"expired": removed, "blobs_deleted": report.blobs_deleted, "bytes_freed": report.bytes_freed}
    summary = f"expired {removed} memories; removed {report.blobs_deleted} blobs ({report.bytes_freed} bytes)"
    _emit(args, payload, lambda: print(summary))
    return 0
