"""PostgreSQL for integration tests: one migrated template per session, a database per test.

Migrating once and copying the template (`CREATE DATABASE ... TEMPLATE ...`) gives every test
a fresh, fully migrated database in a few milliseconds, and no test sees another's rows.
The server is the local one (trust auth); without it the tests that need it are skipped, and
fail when CI=true (see `require_service`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import asyncpg
import pytest

from receiver.store.postgres import PostgresStore

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
T = TypeVar("T")


def pg_url(database: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{database}"


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on a loop of its own in another thread.

    The fixtures below are synchronous, so any test (sync or async, any loop scope) can use
    them, and their admin connections never touch the test's event loop.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(*statements: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    store = PostgresStore(url)
    try:
        await store.migrate()
    finally:
        await store.close()


class PostgresTemplate:
    """The session's migrated template database, created on first use."""

    def __init__(self) -> None:
        self.name: str | None = None

    def get(self) -> str:
        if self.name is None:
            name = f"receiver_tpl_{secrets.token_hex(4)}"
            run_sync(_admin(f'CREATE DATABASE "{name}"'))
            self.name = name  # set before migrating, so a failed migration is still dropped
            run_sync(_migrate(pg_url(name)))
        return self.name

    def drop(self) -> None:
        if self.name is not None:
            run_sync(_admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self.name = None


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[PostgresTemplate]:
    """Lazily created, so a session that never needs PostgreSQL never connects to it."""
    template = PostgresTemplate()
    yield template
    template.drop()


@pytest.fixture
def postgres_url(
    require_service: Callable[[str, int, str], None], postgres_template: PostgresTemplate
) -> Iterator[str]:
    """The URL of a fresh, migrated database of this test's own, dropped afterwards."""
    require_service(PG_HOST, PG_PORT, "PostgreSQL")
    template = postgres_template.get()
    name = f"receiver_test_{secrets.token_hex(6)}"
    run_sync(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    yield pg_url(name)
    run_sync(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def postgres_empty_url(require_service: Callable[[str, int, str], None]) -> Iterator[str]:
    """The URL of a fresh database with no schema at all (for migration tests)."""
    require_service(PG_HOST, PG_PORT, "PostgreSQL")
    name = f"receiver_test_{secrets.token_hex(6)}"
    run_sync(_admin(f'CREATE DATABASE "{name}"'))
    yield pg_url(name)
    run_sync(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
