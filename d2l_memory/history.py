"""The verbatim message log of every conversation, in the same SQL database as the adapter index.

Each message moves through three states:
    verbatim   -> in the prompt window as text;
    compacting -> claimed by one writer that is turning it into adapter chunks (still shown as text,
                  so nothing disappears from the prompt if that writer dies; claims older than
                  CLAIM_TIMEOUT are released again);
    compacted  -> its content lives in the session's memory adapter; kept as the transcript of record.
Claims are conditional UPDATEs, so two processes never compact the same message twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from d2l_store import Scope
from d2l_store.db import WRITE_OPTION
from sqlalchemy import DateTime, Engine, Index, Integer, String, Text, delete, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

CLAIM_TIMEOUT = timedelta(minutes=10)
VERBATIM, COMPACTING, COMPACTED = "verbatim", "compacting", "compacted"


class _Base(DeclarativeBase):
    pass


class MessageRow(_Base):
    __tablename__ = "d2l_memory_messages"
    __table_args__ = (Index("ix_d2l_memory_messages_session", "tenant", "user", "agent", "session", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    user: Mapped[str] = mapped_column(String(128))
    agent: Mapped[str] = mapped_column(String(128))
    session: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=VERBATIM)
    claim: Mapped[str | None] = mapped_column(String(32), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class LoggedMessage:
    id: int
    role: str
    content: str
    state: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Claim:
    """Messages one writer is compacting; commit or release it."""

    token: str
    messages: tuple[LoggedMessage, ...]


def _now() -> datetime:
    return datetime.now(UTC)


class MessageLog:
    """Append, read and claim messages per session scope (exact match on all four scope fields)."""

    def __init__(self, engine: Engine) -> None:
        _Base.metadata.create_all(engine)  # one table, created if missing; additive changes only
        self._read = sessionmaker(engine)
        self._write = sessionmaker(engine.execution_options(**{WRITE_OPTION: True}))

    @staticmethod
    def _where(scope: Scope) -> tuple:
        return (
            MessageRow.tenant == scope.tenant, MessageRow.user == scope.user,
            MessageRow.agent == scope.agent, MessageRow.session == scope.session,
        )  # fmt: skip

    def append(self, scope: Scope, messages: Sequence[dict[str, str]]) -> None:
        now = _now()
        with self._write() as s, s.begin():
            s.add_all(
                MessageRow(tenant=scope.tenant, user=scope.user, agent=scope.agent, session=scope.session,
                           role=m["role"], content=m["content"], state=VERBATIM, created_at=now)
                for m in messages
            )  # fmt: skip

    def messages(self, scope: Scope, states: Sequence[str] = (VERBATIM, COMPACTING, COMPACTED)) -> list[LoggedMessage]:
        q = select(MessageRow).where(*self._where(scope), MessageRow.state.in_(states)).order_by(MessageRow.id)
        with self._read() as s:
            return [LoggedMessage(r.id, r.role, r.content, r.state) for r in s.scalars(q)]

    def window(self, scope: Scope) -> list[LoggedMessage]:
        """Messages not yet in the adapter: the verbatim part of the prompt."""
        return self.messages(scope, (VERBATIM, COMPACTING))

    def count(self, scope: Scope) -> int:
        with self._read() as s:
            return int(s.scalar(select(func.count()).select_from(MessageRow).where(*self._where(scope))) or 0)

    def claim(self, scope: Scope, ids: Sequence[int]) -> Claim | None:
        """Atomically claim these verbatim messages (or stale claims); None if anyone else holds one."""
        token = uuid.uuid4().hex
        now = _now()
        stale = now - CLAIM_TIMEOUT
        with self._write() as s, s.begin():
            abandoned = (MessageRow.state == COMPACTING) & (MessageRow.claimed_at < stale)
            claimable = (MessageRow.state == VERBATIM) | abandoned
            done = s.execute(
                update(MessageRow)
                .where(*self._where(scope), MessageRow.id.in_(list(ids)), claimable)
                .values(state=COMPACTING, claim=token, claimed_at=now)
            ).rowcount
            if done != len(ids):
                s.rollback()
                return None
            rows = s.scalars(select(MessageRow).where(MessageRow.claim == token).order_by(MessageRow.id)).all()
            claimed = tuple(LoggedMessage(r.id, r.role, r.content, COMPACTING) for r in rows)
        return Claim(token, claimed)

    def commit(self, claim: Claim) -> None:
        self._finish(claim, COMPACTED)

    def release(self, claim: Claim) -> None:
        self._finish(claim, VERBATIM)

    def _finish(self, claim: Claim, state: str) -> None:
        with self._write() as s, s.begin():
            s.execute(update(MessageRow).where(MessageRow.claim == claim.token).values(state=state, claim=None))

    def delete(self, scope: Scope) -> int:
        """Delete a scope's messages; empty user/agent/session fields match everything (like the store)."""
        conditions = [MessageRow.tenant == scope.tenant]
        for field in ("user", "agent", "session"):
            if getattr(scope, field):
                conditions.append(getattr(MessageRow, field) == getattr(scope, field))
        with self._write() as s, s.begin():
            return int(s.execute(delete(MessageRow).where(*conditions)).rowcount)
