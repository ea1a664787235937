"""The gateway's modules import one another one way: no module reaches itself again through
its imports (lazy imports inside functions count too). The key model sits below the stores
that implement it, and the factories that open a store sit above them."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with the dev extra (import-linter)")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("gateway")


def test_no_gateway_module_imports_itself_back(graph):
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported.startswith("gateway") and graph.chain_exists(
                    importer=imported, imported=module, as_packages=False):
                back = graph.find_shortest_chain(importer=imported, imported=module,
                                                 as_packages=False)
                cycles.append(" -> ".join((module, *back)))
    assert not cycles, "\n".join(cycles)


def test_the_key_model_reaches_no_store_and_the_factories_live_above_the_stores(graph):
    # as packages: neither gateway.stores nor any module in it
    assert not graph.chain_exists(importer="gateway.keys", imported="gateway.stores")
    factories = graph.find_modules_directly_imported_by("gateway.stores")
    assert {"gateway.stores.sqlite_keys", "gateway.stores.redis_keys",
            "gateway.stores.memory_ratelimit", "gateway.stores.redis_ratelimit",
            "gateway.stores.memory_cache", "gateway.stores.redis_cache"} <= factories
    assert "gateway.stores" in graph.find_modules_directly_imported_by("gateway.app")
