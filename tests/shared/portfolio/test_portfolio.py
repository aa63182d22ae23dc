"""Tests for shared.portfolio: reservations, fills, refusals, fenced writes, replay and the CLI."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from decimal import Decimal as D
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.cli.service import main as cli_main
from shared.bus import Idempotency
from shared.clock import LiveClock, SimulatedClock
from shared.config import LockSettings, PortfolioSettings
from shared.errors import (
    FillRefused,
    InsufficientFunds,
    InsufficientPosition,
    PortfolioConflict,
    PortfolioError,
    RedisUnavailable,
    StaleFencingToken,
    UnknownReservation,
)
from shared.keys import Keys
from shared.portfolio import Portfolio, lock_resource, read_ledger, verify
from shared.portfolio.locks import FencedLock
from tests.conftest import SERVER_BACKENDS
from tests.support.factories import fill
from tests.support.portfolio import StallsBeforeWriting


def handle(client: redis.Redis, keys: Keys, cls: type[Portfolio] = Portfolio, **settings: Any) -> Portfolio:
    return cls(client, keys, "acct", settings=PortfolioSettings(account="acct", **settings),
               lock_settings=LockSettings(lease_ms=2000, wait_ms=5000), clock=SimulatedClock())


def ledger_len(client: redis.Redis, keys: Keys) -> int:
    return int(client.xlen(keys.ledger("acct")))


def everything(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Every portfolio hash and the ledger length: 'nothing changed' means this is equal."""
    parts = {name: client.hgetall(keys.portfolio_part("acct", name))
             for name in ("positions", "reservations", "closed", "fills")}
    return {"state": client.hgetall(keys.portfolio("acct")), **parts, "ledger": ledger_len(client, keys)}


@pytest.fixture
def book(redis_client: redis.Redis, keys: Keys) -> Portfolio:
    portfolio = handle(redis_client, keys)
    portfolio.open(D("10000"))
    return portfolio


class TestReserve:
    def test_buy_holds_cost_plus_fee_buffer(self, book: Portfolio) -> None:
        """A buy reservation holds quantity x price plus fee_buffer_bps (10 bps by default)."""
        outcome = book.reserve("r1", "AAPL", "buy", D(40), D(150))
        assert outcome.amount == D("6006")
        snap = book.snapshot()
        assert (snap.cash, snap.reserved, snap.buying_power) == (D(10000), D(6006), D(3994))

    def test_second_buy_beyond_buying_power_is_refused_with_figures(self, book: Portfolio,
                                                                     redis_client: redis.Redis,
                                                                     keys: Keys) -> None:
        """The classic $12,000-from-$10,000 overspend is refused with what was needed and what was free."""
        book.reserve("r1", "AAPL", "buy", D(40), D(150))
        before = everything(redis_client, keys)
        with pytest.raises(InsufficientFunds) as caught:
            book.reserve("r2", "AAPL", "buy", D(40), D(150))
        assert (caught.value.needed, caught.value.available) == (D("6006"), D("3994"))
        assert everything(redis_client, keys) == before

    def test_sell_limited_to_position_minus_sell_reservations(self, book: Portfolio) -> None:
        """Quantity already reserved for sells cannot be reserved again."""
        book.reserve("b", "MSFT", "buy", D(10), D(100))
        book.apply_fill("b", fill("f1", "10", "100"))
        book.reserve("s1", "MSFT", "sell", D(6), D(110))
        with pytest.raises(InsufficientPosition) as caught:
            book.reserve("s2", "MSFT", "sell", D(5), D(110))
        assert caught.value.available == D(4)
        assert book.reserve("s3", "MSFT", "sell", D(4), D(110)).amount == D(4)

    def test_short_sell_allowed_only_when_enabled(self, redis_client: redis.Redis, keys: Keys) -> None:
        """With allow_short a sell may exceed the position; without it, it may not."""
        shorting = handle(redis_client, keys, allow_short=True)
        shorting.open(D(1000))
        shorting.reserve("s", "TSLA", "sell", D(2), D(100))
        shorting.apply_fill("s", fill("f", "2", "100"))
        assert shorting.snapshot().positions["TSLA"].qty == D(-2)
        assert verify(redis_client, keys, "acct", allow_short=True).ok
        assert not verify(redis_client, keys, "acct", allow_short=False).ok

    def test_same_id_same_terms_is_idempotent_other_terms_refused(self, book: Portfolio) -> None:
        """Re-reserving an open id with the same terms returns it unchanged; other terms are refused."""
        first = book.reserve("r1", "AAPL", "buy", D(1), D(10))
        again = book.reserve("r1", "AAPL", "buy", D(1), D(10))
        assert again.duplicate and again.amount == first.amount
        assert book.snapshot().version == 2
        with pytest.raises(PortfolioError):
            book.reserve("r1", "AAPL", "buy", D(2), D(10))

    def test_float_money_is_refused(self, book: Portfolio) -> None:
        """Money must be Decimal: a float price is refused before anything happens."""
        with pytest.raises(ValueError):
            book.reserve("r1", "AAPL", "buy", D(1), 10.5)  # type: ignore[arg-type]


class TestRelease:
    def test_release_returns_what_is_held_and_is_idempotent(self, book: Portfolio) -> None:
        """Releasing frees the held cash; releasing again is a no-op, not an error."""
        book.reserve("r1", "AAPL", "buy", D(10), D(100))
        assert book.release("r1", "canceled").amount == D("1001")
        assert book.snapshot().reserved == 0
        again = book.release("r1")
        assert again.duplicate and not again.changed

    def test_unknown_reservation(self, book: Portfolio) -> None:
        """Releasing a reservation that never existed raises UnknownReservation."""
        with pytest.raises(UnknownReservation):
            book.release("nope")


class TestFills:
    def test_partial_then_full_fill_returns_unused_reservation(self, book: Portfolio) -> None:
        """Partial fills spend from the reservation; completing the order gives back the rest."""
        book.reserve("r1", "AAPL", "buy", D(40), D(150))
        first = book.apply_fill("r1", fill("f1", "10", "149", "0.5"))
        assert not first.completed and book.snapshot().reserved == D("6006") - D("1490.5")
        last = book.apply_fill("r1", fill("f2", "30", "150", "0.5"))
        assert last.completed and last.amount == D("6006") - D("1490.5") - D("4500.5")
        assert (first.position_before, last.position_before) == (D(0), D(10))
        snap = book.snapshot()
        assert (snap.cash, snap.reserved, snap.fees) == (D("4009"), D(0), D(1))
        assert snap.positions["AAPL"].qty == 40
        assert snap.positions["AAPL"].avg_cost == D("149.75")
        assert snap.reservations == {}

    def test_sell_fill_realizes_pnl_against_average_cost(self, book: Portfolio) -> None:
        """Selling above average cost books (price - avg) x qty as realized PnL and adds proceeds to cash."""
        book.reserve("b", "AAPL", "buy", D(10), D(100))
        book.apply_fill("b", fill("f1", "10", "100"))
        book.reserve("s", "AAPL", "sell", D(4), D(120))
        outcome = book.apply_fill("s", fill("f2", "4", "120", "1"))
        snap = book.snapshot()
        assert outcome.realized == D(80)
        assert (snap.realized_pnl, snap.fees, snap.cash) == (D(80), D(1), D(10000) - D(1000) + D(479))
        assert snap.positions["AAPL"].qty == 6

    def test_duplicate_fill_changes_nothing(self, book: Portfolio, redis_client: redis.Redis,
                                            keys: Keys) -> None:
        """The same fill id applied twice (even after its order completed) is ignored: no write, no entry."""
        book.reserve("r1", "AAPL", "buy", D(5), D(10))
        book.apply_fill("r1", fill("f1", "5", "10"))
        before = everything(redis_client, keys)
        outcome = book.apply_fill("r1", fill("f1", "5", "10"))
        assert outcome.duplicate and not outcome.changed
        assert everything(redis_client, keys) == before

    def test_fill_naming_nothing_traded_is_refused(self, book: Portfolio, redis_client: redis.Redis,
                                                   keys: Keys) -> None:
        """A fill with no open reservation and no side/symbol cannot be booked: UnknownReservation,
        nothing changes."""
        before = everything(redis_client, keys)
        with pytest.raises(UnknownReservation):
            book.apply_fill("ghost", fill("f1", "1", "10"))
        assert everything(redis_client, keys) == before

    def test_fill_of_a_closed_reservation_is_booked_as_a_fact(self, book: Portfolio,
                                                              redis_client: redis.Redis, keys: Keys) -> None:
        """An order released here that the broker filled anyway: the fill is booked (cash, position,
        ledger), said to be beyond its reservation, and verify still passes."""
        book.reserve("r1", "AAPL", "buy", D(5), D(10))
        book.release("r1", "rejected")
        outcome = book.apply_fill("r1", fill("f1", "5", "10"), side="buy", symbol="AAPL")
        assert outcome.changed and "closed" not in outcome.beyond and "rejected" in outcome.beyond
        snap = book.snapshot()
        assert (snap.cash, snap.reserved, snap.positions["AAPL"].qty) == (D(9950), D(0), D(5))
        assert list(read_ledger(redis_client, keys, "acct"))[-1]["beyond"] == outcome.beyond
        assert verify(redis_client, keys, "acct", allow_short=False).ok

    def test_over_fill_is_booked_and_closes_the_reservation(self, book: Portfolio) -> None:
        """The broker filled more than the order: every share is booked, the reservation closes, and
        ``beyond`` names the over-fill."""
        book.reserve("r1", "AAPL", "buy", D(5), D(10))
        book.apply_fill("r1", fill("f1", "3", "10"))
        outcome = book.apply_fill("r1", fill("f2", "3", "10"))
        assert outcome.completed and outcome.beyond.startswith("over-fill")
        snap = book.snapshot()
        assert (snap.positions["AAPL"].qty, snap.cash, snap.reserved, snap.reservations) == (
            D(6), D(9940), D(0), {})

    def test_fill_costing_more_than_the_account_has_overdraws_it(self, redis_client: redis.Redis,
                                                               keys: Keys) -> None:
        """A fill whose price blew through the buffer and the free cash is booked: cash goes
        negative, ``beyond`` says by how much, and verify passes (the controls are off after it)."""
        book = handle(redis_client, keys)
        book.open(D(1000))
        book.reserve("r1", "AAPL", "buy", D(9), D(100))
        outcome = book.apply_fill("r1", fill("f1", "9", "120"))
        assert outcome.beyond.startswith("costs 1080")
        assert book.snapshot().cash == D(-80)
        assert verify(redis_client, keys, "acct", allow_short=False).ok

    def test_fill_within_free_cash_is_not_beyond(self, book: Portfolio) -> None:
        """Slippage that free cash covers is ordinary: booked, nothing said."""
        book.reserve("r1", "AAPL", "buy", D(9), D(100))
        outcome = book.apply_fill("r1", fill("f1", "9", "120"))
        assert outcome.beyond == "" and book.snapshot().cash == D(10000 - 1080)

    def test_fill_that_does_not_match_its_reservation_is_refused(self, book: Portfolio) -> None:
        """A sell fill against a buy reservation is a bug, not a fact: FillRefused, nothing booked."""
        book.reserve("r1", "AAPL", "buy", D(5), D(10))
        with pytest.raises(FillRefused):
            book.apply_fill("r1", fill("f1", "5", "10"), side="sell", symbol="AAPL")
        assert book.snapshot().reserved == D("50.05")


class TestLedger:
    def test_ledger_replays_to_state_and_entries_are_readable(
            self, book: Portfolio, redis_client: redis.Redis, keys: Keys) -> None:
        """Each mutation appends one human-readable entry; replaying them equals the state in Redis."""
        book.reserve("r1", "AAPL", "buy", D(2), D(10))
        book.apply_fill("r1", fill("f1", "2", "10", "0.1"))
        entries = list(read_ledger(redis_client, keys, "acct"))
        assert [e["op"] for e in entries] == ["open", "reserve", "fill"]
        assert entries[1]["amount"] == "20.020" and entries[1]["v"] == "2"
        report = verify(redis_client, keys, "acct", allow_short=False)
        assert report.ok and report.entries == 3

    def test_verify_reports_a_tampered_state(self, book: Portfolio, redis_client: redis.Redis,
                                             keys: Keys) -> None:
        """A state edited behind the ledger's back is caught, naming the field."""
        redis_client.hset(keys.portfolio("acct"), "cash", "20000")
        report = verify(redis_client, keys, "acct", allow_short=False)
        assert not report.ok and "cash" in report.problems[0]


class TestWriteRefusals:
    def test_stale_token_refused_nothing_changes_retry_succeeds(self, redis_client: redis.Redis,
                                                                keys: Keys) -> None:
        """If another holder's token was issued after the decision, the write is refused and a retry works."""
        book = handle(redis_client, keys, cls=StallsBeforeWriting)
        book.open(D(10000))
        before = everything(redis_client, keys)
        book.stall = lambda: redis_client.incr(keys.fence(lock_resource("acct")))  # type: ignore[attr-defined]
        with pytest.raises(StaleFencingToken):
            book.reserve("r1", "AAPL", "buy", D(1), D(10))
        assert everything(redis_client, keys) == before
        assert not redis_client.exists(keys.lock(lock_resource("acct")))
        assert book.reserve("r1", "AAPL", "buy", D(1), D(10)).changed
        assert verify(redis_client, keys, "acct", allow_short=False).ok

    def test_commands_queued_behind_a_write_see_it_and_a_refused_write_publishes_nothing(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """A publish queued behind the reservation's write (``then``) goes out with it; behind a
        refused write it finds no reservation and adds nothing; an open reservation queues nothing."""
        book = handle(redis_client, keys, cls=StallsBeforeWriting)
        book.open(D(10000))
        once = Idempotency(redis_client, keys, "risk", ttl_s=60)
        stream = keys.stream("orders")
        fields = {"k": "v"}

        def publish(pipe: Any) -> None:
            once.queue_publish_once(pipe, "r1", stream, fields, 1000, provided=(book.reservations_key, "r1"))

        book.stall = lambda: redis_client.incr(keys.fence(lock_resource("acct")))  # type: ignore[attr-defined]
        with pytest.raises(StaleFencingToken):
            book.reserve("r1", "AAPL", "buy", D(1), D(10), then=publish)
        assert redis_client.xlen(stream) == 0 and not once.seen("r1")
        outcome = book.reserve("r1", "AAPL", "buy", D(1), D(10), then=publish)
        assert outcome.followed is not None and once.published(outcome.followed[0]) is True
        assert redis_client.xlen(stream) == 1
        again = book.reserve("r1", "AAPL", "buy", D(1), D(10), then=publish)
        assert again.duplicate and again.followed is None

    def test_a_reservation_made_under_a_lock_taken_with_the_reads_does_not_lock_again(
            self, redis_client: redis.Redis, keys: Keys) -> None:
        """The lock taken in a batched read is the one the reservation is written under (one
        fencing token for read, decision and write); a busy lock gives the snapshot and no hold."""
        book = handle(redis_client, keys)
        book.open(D(10000))
        fence_key = keys.fence(lock_resource("acct"))
        before = int(redis_client.get(fence_key))
        with redis_client.pipeline(transaction=False) as pipe:
            lock = book.queue_reads_holding(pipe, "r1")
            raw, _ = pipe.execute()
        snapshot, held = book.held_from(lock, raw, "r1")
        assert held is not None and snapshot.cash == D(10000)
        assert book.reserve("r1", "AAPL", "buy", D(1), D(10), held=held).changed
        assert int(redis_client.get(fence_key)) == before + 1
        assert not redis_client.exists(keys.lock(lock_resource("acct")))
        with FencedLock.from_settings(redis_client, keys, lock_resource("acct"), LockSettings(),
                                      LiveClock()):
            with redis_client.pipeline(transaction=False) as pipe:
                lock = book.queue_reads_holding(pipe, "r2")
                raw, _ = pipe.execute()
            snapshot, held = book.held_from(lock, raw, "r2")
        assert held is None and set(snapshot.reservations) == {"r1"}
        assert verify(redis_client, keys, "acct", allow_short=False).ok

    def test_version_moved_refused(self, redis_client: redis.Redis, keys: Keys) -> None:
        """A state version that moved between read and write makes the script refuse (PortfolioConflict)."""
        book = handle(redis_client, keys, cls=StallsBeforeWriting)
        book.open(D(10000))
        book.stall = lambda: redis_client.hincrby(keys.portfolio("acct"), "version", 1)  # type: ignore[attr-defined]
        with pytest.raises(PortfolioConflict):
            book.reserve("r1", "AAPL", "buy", D(1), D(10))
        assert ledger_len(redis_client, keys) == 1
        assert book.snapshot().reserved == 0


class _Proxy:
    """A TCP proxy to Redis that drops the connection when it sees ``trigger`` go to the server:
    before forwarding it (``after=False``) or after, losing the reply (``after=True``)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.trigger: bytes | None = None
        self.after = False
        self.tripped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            drop_reply = threading.Event()
            threading.Thread(target=self._up, args=(client, server, drop_reply), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, drop_reply), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, drop_reply: threading.Event) -> None:
        while data := _recv(client):
            if self.trigger is not None and self.trigger in data:
                self.trigger = None
                if self.after:  # forward the whole command (it may span chunks), lose the reply
                    drop_reply.set()
                    server.sendall(data)
                    continue
                self.tripped.set()
                _hang_up(client, server)
                return
            server.sendall(data)

    def _down(self, server: socket.socket, client: socket.socket, drop_reply: threading.Event) -> None:
        while data := _recv(server):
            if drop_reply.is_set():
                self.tripped.set()
                _hang_up(client, server)
                return
            client.sendall(data)

    def close(self) -> None:
        self.listener.close()


def _hang_up(*socks: socket.socket) -> None:
    for sock in socks:  # shutdown first: a close alone waits for the other pump's blocked recv
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@pytest.mark.parametrize("server_url", SERVER_BACKENDS, indirect=True)
class TestConnectionDrop:
    def _setup(self, server_url: str, keys: Keys) -> tuple[_Proxy, redis.Redis, Portfolio]:
        target = redis.Redis.from_url(server_url)
        port = target.connection_pool.connection_kwargs["port"]
        proxy = _Proxy(port)
        password = target.connection_pool.connection_kwargs.get("password")
        # no redis-py retries: the caller must see the drop (with them, a resent write is answered
        # "dup" by the script when it had landed, or simply lands)
        client = redis.Redis(port=proxy.port, password=password, socket_timeout=10,
                             retry=Retry(NoBackoff(), 0))
        # a live clock: the retry waits for the dropped holder's real 300 ms lease to expire
        book = Portfolio(client, keys, "acct", settings=PortfolioSettings(account="acct"),
                         lock_settings=LockSettings(lease_ms=300, wait_ms=10_000), clock=LiveClock())
        book.open(D(10000))
        proxy.trigger = book._write.sha.encode()  # the EVALSHA of the write script
        return proxy, target, book

    def test_drop_stall_changes_nothing_and_retry_succeeds(self, server_url: str, keys: Keys) -> None:
        """The connection drops as the write is sent: RedisUnavailable, nothing changed, a retry works."""
        proxy, target, book = self._setup(server_url, keys)
        try:
            before = everything(target, keys)
            with pytest.raises(RedisUnavailable):
                book.reserve("r1", "AAPL", "buy", D(40), D(150))
            assert proxy.tripped.is_set()
            assert everything(target, keys) == before
            assert book.reserve("r1", "AAPL", "buy", D(40), D(150)).amount == D("6006")
            assert ledger_len(target, keys) == 2
            assert verify(target, keys, "acct", allow_short=False).ok
        finally:
            proxy.close()
            _cleanup(target, keys)

    def test_reply_lost_after_write_retry_is_idempotent(self, server_url: str, keys: Keys) -> None:
        """The write lands but its reply is lost: the caller sees RedisUnavailable; its retry adds nothing."""
        proxy, target, book = self._setup(server_url, keys)
        proxy.after = True
        try:
            with pytest.raises(RedisUnavailable):
                book.reserve("r1", "AAPL", "buy", D(40), D(150))
            assert proxy.tripped.is_set()
            again = book.reserve("r1", "AAPL", "buy", D(40), D(150))
            assert again.duplicate and again.amount == D("6006")
            assert ledger_len(target, keys) == 2
            assert verify(target, keys, "acct", allow_short=False).ok
        finally:
            proxy.close()
            _cleanup(target, keys)


def _cleanup(client: redis.Redis, keys: Keys) -> None:
    for key in client.scan_iter(match=keys.pattern()):
        client.delete(key)
    client.close()


@pytest.mark.parametrize("server_url", ["redis"], indirect=True)
class TestCli:
    def test_portfolio_and_verify_commands(self, server_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        """``bastion portfolio --json`` shows equity at marks; ``bastion verify`` exits 0, 1 once tampered."""
        client = redis.Redis.from_url(server_url)
        try:
            book = Portfolio(client, keys, "acct")
            book.open(D(10000))
            book.reserve("r1", "AAPL", "buy", D(10), D(100))
            book.apply_fill("r1", fill("f1", "10", "100", "1"))
            client.hset(keys.last_price, "AAPL", "110")  # as the ingester writes it
            monkeypatch.setenv("REDIS_URL", server_url)
            monkeypatch.setenv("BASTION_KEY_PREFIX", keys.prefix)
            monkeypatch.setenv("BASTION_PORTFOLIO__ACCOUNT", "acct")
            assert cli_main(["portfolio", "--json"]) == 0
            shown = json.loads(capsys.readouterr().out)
            assert (D(shown["cash"]), D(shown["equity"]), D(shown["buying_power"])) == (
                D(8999), D(10099), D(8999))
            assert shown["positions"]["AAPL"]["mark"] == "110"
            assert cli_main(["verify"]) == 0
            client.hset(keys.portfolio_part("acct", "positions"), "AAPL:qty", "11")
            capsys.readouterr()
            assert cli_main(["verify"]) == 1
            assert "AAPL" in capsys.readouterr().out
        finally:
            _cleanup(client, keys)
