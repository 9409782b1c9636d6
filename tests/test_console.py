"""The ops console in a real browser: Debian's Chromium, driven by Playwright, against a live
`airlock serve` and worker, signed in with tokens from the local OIDC issuer."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import wiring
from orchestrator.adapters.store import Store
from orchestrator.config import Settings
from tests.conftest import IN_CI, ROOT
from tests.test_api import Api, api  # noqa: F401  (the live API, a session fixture)

pytestmark = [pytest.mark.docker, pytest.mark.browser]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "docs" / "console"
# Chromium as root, headless, and quiet on a machine with no network of its own.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SLOW_LINES = (
    "import time\nfor i in range(8):\n    print(f'line {i}', flush=True)\n    time.sleep(0.5)\n"
)
DENIED = (
    "import urllib.request, urllib.error\n"
    "try:\n"
    "    urllib.request.urlopen('http://127.0.0.1:18080/admin', timeout=10)\n"
    "except urllib.error.HTTPError as exc:\n"
    "    print('refused', exc.code, flush=True)\n" + SLOW_LINES
)


@pytest.fixture
def live(api: Api) -> Api:  # noqa: F811  (tests/test_api.py's session fixture)
    return api


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (scripts/bootstrap installs Debian's chromium)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    from playwright.sync_api import sync_playwright  # the browser tests' own dependency

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


def signed_in(browser: Any, live: Api, name: str, width: int = 1280, js: bool = True) -> Any:
    """A fresh browser context signed in as `name` through the login form."""
    context = browser.new_context(viewport={"width": width, "height": 900}, java_script_enabled=js)
    page = context.new_page()
    page.goto(f"{live.url}/ui/")
    assert "/ui/login" in page.url  # no cookie: sent to sign in first
    page.get_by_label("Access token").fill(live.token(name))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/ui/$"))
    return page


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def submit(live: Api, who: str, code: str, agent: str = "tester") -> str:
    answer = live.submit(who, {"agent": agent, "command": ["python3", "-c", code]})
    assert answer.status == 201, answer
    return str(answer.body["id"])


def test_a_running_task_appears_on_runners_and_leaves_when_it_ends(browser: Any, live: Api) -> None:
    from playwright.sync_api import expect

    page = signed_in(browser, live, "oncall")
    expect(page.get_by_role("heading", name="Runners")).to_be_visible()
    expect(page.get_by_text("sees every task")).to_be_visible()
    task_id = submit(live, "alice", SLOW_LINES)
    row = page.locator(f'tr[data-task="{task_id}"]')
    seen = time.monotonic()
    expect(row).to_be_visible(timeout=20_000)  # pushed by the server: no reload
    expect(row.locator(".state")).to_have_text("running", timeout=20_000)
    print(f"runners: task shown {time.monotonic() - seen:.2f}s after submit")
    expect(row).to_contain_text("alice")
    shot(page, "runners")
    live.wait("alice", task_id)
    expect(row).to_have_count(0, timeout=10_000)  # ended: gone from the live view
    page.context.close()


def test_a_task_page_shows_its_life_its_decisions_its_logs_and_its_receipt(
    browser: Any, live: Api
) -> None:
    from playwright.sync_api import expect

    page = signed_in(browser, live, "alice")
    task_id = submit(live, "alice", DENIED, agent="web")
    for _ in range(200):  # open it while it runs
        if live.call("GET", f"/v1/tasks/{task_id}", token=live.token("alice")).body["state"] == (
            "running"
        ):
            break
        time.sleep(0.05)
    page.goto(f"{live.url}/ui/tasks/{task_id}")
    logs = page.locator("pre#logs")
    expect(logs).to_contain_text("line 5", timeout=20_000)  # followed live
    expect(page.locator("#task-state")).to_contain_text("succeeded", timeout=20_000)
    page.wait_for_load_state()
    for phase in ("admit", "provision", "launch", "run", "teardown"):
        expect(page.get_by_role("cell", name=phase, exact=True).first).to_be_visible()
    denied = page.locator("tr.decision-deny").first
    expect(denied).to_contain_text("plain")  # the rule, by name
    expect(denied).to_contain_text("path is outside")
    expect(page.locator("#receipt")).to_contain_text("Verified")
    expect(page.locator("#receipt")).to_contain_text("Task JWT")
    shot(page, "task")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "task-phone")
    page.context.close()


def test_a_user_sees_only_their_own_tasks(
    browser: Any, live: Api, settings: Settings, store: Store
) -> None:
    from playwright.sync_api import expect

    others = live.submit("ci-bot", {"agent": "tester", "command": ["true"]})
    assert others.status == 201, others
    theirs = str(others.body["id"])
    live.wait("ci-bot", theirs)
    page = signed_in(browser, live, "alice")
    answer = page.goto(f"{live.url}/ui/tasks/{theirs}")
    assert answer is not None and answer.status == 404
    expect(page.get_by_role("heading", name="No such task")).to_be_visible()
    page.goto(f"{live.url}/ui/tasks")
    expect(page.get_by_role("heading", name="Tasks")).to_be_visible()
    assert theirs[:8] not in page.content()
    answer = page.goto(f"{live.url}/ui/audit?task={theirs}")
    assert answer is not None and answer.status == 404
    page.context.close()
    ops = signed_in(browser, live, "oncall")
    ops.goto(f"{live.url}/ui/tasks?submitter=service:ci-bot")
    expect(ops.get_by_role("link", name=theirs[:8])).to_be_visible()
    shot(ops, "tasks")
    for _ in range(100):  # the chains are checked on a thread of their own, then shown
        ops.goto(f"{live.url}/ui/audit?denied=true")
        if "being checked" not in ops.locator("#chain").inner_text():
            break
        time.sleep(0.1)
    # What `airlock audit verify` finds in this namespace (other tests tamper with chains
    # on purpose), the page says.
    _, problems = wiring.audit_log(settings, store).verify()
    shown = "no problem found" if not problems else f"{len(problems)} problem(s)"
    expect(ops.locator("#chain")).to_contain_text(shown)
    shot(ops, "audit")
    ops.context.close()


def test_the_console_reads_without_javascript_and_at_phone_width(browser: Any, live: Api) -> None:
    task_id = submit(live, "alice", "print('plain html')")
    live.wait("alice", task_id)
    page = signed_in(browser, live, "alice", width=390, js=False)
    page.goto(f"{live.url}/ui/tasks/{task_id}")
    assert "plain html" in page.locator("pre#logs").inner_text()
    # Nothing wider than the phone's screen but the tables' own scroll boxes.
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, overflow
    page.context.close()


def test_the_console_is_usable_from_the_keyboard(browser: Any, live: Api) -> None:
    page = signed_in(browser, live, "alice")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for field in ("State", "Agent", "User", "Submitter", "Since"):
        page.goto(f"{live.url}/ui/tasks")
        assert page.get_by_label(field).count() == 1, field  # every control has a label
    page.context.close()


def test_signing_in_with_a_bad_token_says_why_and_sets_nothing(browser: Any, live: Api) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{live.url}/ui/login")
    page.get_by_label("Access token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    assert "Not signed in" in page.get_by_role("alert").inner_text()
    assert not [c for c in context.cookies() if c["name"] == "airlock_console"]
    context.close()


def _luminance(hex_color: str) -> float:
    channels = [int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_the_consoles_colours_have_enough_contrast() -> None:
    """WCAG AA: 4.5:1 for text against the page, for every colour text is set in."""
    css = (ROOT / "orchestrator" / "api" / "static" / "console.css").read_text()
    colours = dict(re.findall(r"--([a-z]+):(#[0-9a-f]{6})", css))
    background = _luminance(colours["bg"])
    for name in ("fg", "muted", "accent", "ok", "bad", "warn"):
        ratio = (background + 0.05) / (_luminance(colours[name]) + 0.05)
        assert ratio >= 4.5, (name, round(ratio, 2))


def test_runners_find_live_tasks_recorded_before_the_live_index(store: Store) -> None:
    """A deployment that upgrades with tasks in flight: their records are not in the live
    index yet; the first read adds them, once."""
    old, ended = str(uuid.uuid4()), str(uuid.uuid4())
    for task_id, state in ((old, "running"), (ended, "succeeded")):
        store.redis.hset(store.key(task_id), mapping={"id": task_id, "state": state})
        store.redis.zadd(store.index_key, {task_id: time.time()})
    store.redis.delete(store.keys.live_ready)
    live = {r["id"] for r in store.live_records()}
    assert old in live and ended not in live
    assert store.redis.exists(store.keys.live_ready)
    store.redis.hset(store.key(old), "state", "failed")
    assert old not in {r["id"] for r in store.live_records()}
