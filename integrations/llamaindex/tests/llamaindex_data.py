"""Scopes and documents shared by the LlamaIndex integration tests."""

from d2l_memory import Scope

ALICE = Scope(tenant="acme", user="alice")
BOB = Scope(tenant="acme", user="bob")
ACME = Scope(tenant="acme")
DOC_PARIS = "Alice lives in Paris and works as a baker since 1999. " * 3
DOC_TEAL = "What is the favourite colour of Bob? It is teal. " * 3
DOC_TOOL = "Tool docs: call search(query, limit=10) to find items; errors raise NotFound. " * 3
