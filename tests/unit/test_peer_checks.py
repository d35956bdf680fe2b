"""The broker's peer checks against a fake process table (pure logic, no /proc).

``verify_gate_peer`` authenticates an AuthorizedKeysCommand, ``verify_authenticated``
the post-authentication child early adoption acts on, and the title helpers tell
OpenSSH 9.2's and 10.0's listener, monitor and session processes apart. Each
refusal test changes exactly one fact of a genuine chain, so deleting the check
named in its title makes it fail; find_session's own rules are in test_sessions.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pwd
import types

import pytest

from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.node import procfs, sessions
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt.errors import NoSuchProcess, NotAnSshSession, ProcError

USER = "alice"
UID = 1234
BOB = 1235
ODD_UID = 1236  # the account "alice@notty": a name that reads like alice's session title
GATE_UID = 998  # the AuthorizedKeysCommandUser
PRIVSEP_UID = 101  # sshd's privilege separation user
ACCOUNTS = {USER: UID, "bob": BOB, "alice@notty": ODD_UID, "sshd-adopt": GATE_UID,
            "sshd": PRIVSEP_UID, "root": 0}

SSHD = "/usr/sbin/sshd"
SSHD_SESSION = "/usr/lib/openssh/sshd-session"
EXECUTABLES = sessions.DEFAULT_SSHD_EXECUTABLES
NETNS = "net:[4026531840]"
OTHER_NETNS = "net:[4026532299]"
CONN = Connection(ipaddress.IPv4Address("10.0.0.1"), 22, ipaddress.IPv4Address("10.0.0.2"), 5000)

LISTENER_92 = "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups"
LISTENER_100 = "sshd: /usr/sbin/sshd -D -f /etc/ssh/sshd_config [listener] 1 of 10-100 startups"
LISTENER, MONITOR, CHILD, PEER = 10, 20, 30, 50


def proc(pid: int, ppid: int, uid: int, exe: str | None, title: str, *, euid: int | None = None,
         start: float = 100.0) -> ProcInfo:
    # psutil returns setproctitle's NUL padding as trailing empty arguments.
    return ProcInfo(pid=pid, ppid=ppid, real_uid=uid, effective_uid=uid if euid is None else euid,
                    real_gid=uid, name=(exe or "").rsplit("/", 1)[-1][:15], exe=exe,
                    cmdline=(*title.split(" "), "", ""), start_time=start)


def gate_chain(*, prefix: str = "sshd", exe: str = SSHD) -> dict[int, ProcInfo]:
    """sshd running ``sshd-adopt-keys alice``: listener 10, monitor 20, the command 50."""
    return {
        1: proc(1, 0, 0, "/sbin/init", "init", start=1.0),
        LISTENER: proc(LISTENER, 1, 0, SSHD, LISTENER_92, start=10.0),
        MONITOR: proc(MONITOR, LISTENER, 0, exe, f"{prefix}: {USER} [priv]", euid=GATE_UID,
                      start=20.0),
        PEER: proc(PEER, MONITOR, GATE_UID, "/usr/bin/python3.11",
                   f"python3 /usr/sbin/sshd-adopt-keys {USER}", start=50.0),
    }


def auth_chain(*, prefix: str = "sshd", exe: str = SSHD) -> dict[int, ProcInfo]:
    """A connection just authenticated: monitor 20 forked child 30, which took alice's uid."""
    return {
        1: proc(1, 0, 0, "/sbin/init", "init", start=1.0),
        LISTENER: proc(LISTENER, 1, 0, SSHD, LISTENER_92, start=10.0),
        MONITOR: proc(MONITOR, LISTENER, 0, exe, f"{prefix}: {USER} [priv]", start=20.0),
        CHILD: proc(CHILD, MONITOR, UID, exe, f"{prefix}: {USER} [priv]", start=30.0),
    }


class FakeNode:
    """Every /proc reader sessions.py uses, answered from one dict of ProcInfo."""

    def __init__(self, table: dict[int, ProcInfo]) -> None:
        self.table = table
        self.changed: set[int] = set()
        self.netns: dict[int, str | None] = {}
        self.roots: dict[int, str | None] = {}
        self.kids: dict[int, list[int]] = {}

    def proc_info(self, pid: int) -> ProcInfo:
        if pid not in self.table:
            raise NoSuchProcess(f"process {pid} is gone")
        return self.table[pid]

    def same_process(self, info: ProcInfo) -> bool:
        return info.pid not in self.changed and self.table.get(info.pid) == info

    def still_running(self, pid: int, start_time: float) -> bool:
        info = self.table.get(pid)
        return pid not in self.changed and info is not None and info.start_time == start_time

    def connection_of(self, pid: int) -> Connection | None:
        return CONN if pid == MONITOR else None

    def netns_of(self, pid: int) -> str | None:
        return self.netns.get(pid, NETNS) if pid in self.table else None

    def root_of(self, pid: int) -> str | None:
        return self.roots.get(pid, "/") if pid in self.table else None

    def children_of(self, pid: int) -> list[int]:
        if pid not in self.table:
            raise NoSuchProcess(f"process {pid} is gone")
        if pid in self.kids:
            return list(self.kids[pid])
        return sorted(child for child, info in self.table.items() if info.ppid == pid)


def getpwnam(name: object) -> types.SimpleNamespace:
    if not isinstance(name, str):
        raise TypeError(f"getpwnam() argument must be str, not {type(name).__name__}")
    if name not in ACCOUNTS:
        raise KeyError(f"getpwnam(): name not found: {name!r}")
    return types.SimpleNamespace(pw_name=name, pw_uid=ACCOUNTS[name])


def getpwuid(uid: int) -> types.SimpleNamespace:
    names = [name for name, known in ACCOUNTS.items() if known == uid]
    if not names:
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    return types.SimpleNamespace(pw_name=names[0], pw_uid=uid)


def install(monkeypatch: pytest.MonkeyPatch, table: dict[int, ProcInfo]) -> FakeNode:
    node = FakeNode(table)
    monkeypatch.setattr(procfs, "PROCFS", "/nonexistent/proc")
    for reader in ("proc_info", "same_process", "still_running", "connection_of", "netns_of",
                   "root_of", "children_of"):
        monkeypatch.setattr(procfs, reader, getattr(node, reader))
    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    return node


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> FakeNode:
    return install(monkeypatch, gate_chain())


@pytest.fixture
def auth(monkeypatch: pytest.MonkeyPatch) -> FakeNode:
    return install(monkeypatch, auth_chain())


def replace(node: FakeNode, pid: int, **changes: object) -> None:
    node.table[pid] = dataclasses.replace(node.table[pid], **changes)  # type: ignore[arg-type]


def retitle(node: FakeNode, pid: int, title: str) -> None:
    replace(node, pid, cmdline=(*title.split(" "), "", ""))


def verify_gate(peer_uid: int = GATE_UID, user: str = USER, *, peer: int = PEER,
                executables: frozenset[str] = EXECUTABLES) -> sessions.GateContext:
    return sessions.verify_gate_peer(peer, peer_uid, user, gate_uid=GATE_UID,
                                     executables=executables, netns=NETNS)


def gate_refused(match: str, peer_uid: int = GATE_UID, user: str = USER, *,
                 peer: int = PEER) -> None:
    with pytest.raises(NotAnSshSession, match=match):
        verify_gate(peer_uid, user, peer=peer)


def verify_auth(monitor_start: float = 20.0, *,
                not_users: frozenset[int] = frozenset()) -> sessions.Authenticated:
    return sessions.verify_authenticated(MONITOR, monitor_start, CHILD, executables=EXECUTABLES,
                                         netns=NETNS, not_users=not_users)


def auth_refused(match: str, *, not_users: frozenset[int] = frozenset()) -> None:
    with pytest.raises(NotAnSshSession, match=match):
        verify_auth(not_users=not_users)


# --------------------------------------------------------------------------- verify_gate_peer


def test_gate_accepts_the_genuine_openssh_92_chain(gate: FakeNode) -> None:
    assert verify_gate() == sessions.GateContext(user=USER, uid=UID, monitor=gate.table[MONITOR],
                                                 connection=CONN)


def test_gate_accepts_the_genuine_openssh_100_chain(gate: FakeNode) -> None:
    gate.table.update(gate_chain(prefix="sshd-session", exe=SSHD_SESSION))
    assert verify_gate().monitor.pid == MONITOR


def test_gate_accepts_gate_user_wrappers_up_to_max_gate_chain(gate: FakeNode) -> None:
    # monitor 20 <- sh 41 <- timeout 42 <- sh 43 <- peer 50
    assert sessions.MAX_GATE_CHAIN == 3
    gate.table[41] = proc(41, MONITOR, GATE_UID, "/usr/bin/dash", "/bin/sh -c keys", start=41.0)
    gate.table[42] = proc(42, 41, GATE_UID, "/usr/bin/timeout", "timeout 5 keys", start=42.0)
    gate.table[43] = proc(43, 42, GATE_UID, "/usr/bin/dash", "/bin/sh keys", start=43.0)
    replace(gate, PEER, ppid=43)
    assert verify_gate().monitor.pid == MONITOR


def test_gate_refuses_max_gate_chain_exceeded(gate: FakeNode) -> None:
    for pid in (41, 42, 43, 44):
        gate.table[pid] = proc(pid, MONITOR if pid == 41 else pid - 1, GATE_UID, "/usr/bin/dash",
                               "/bin/sh keys", start=float(pid))
    replace(gate, PEER, ppid=44)
    gate_refused(r"no root sshd within 3 ancestors of 50")


def test_gate_refuses_peer_uid_not_the_gate_users(gate: FakeNode) -> None:
    gate_refused(r"peer uid 1234 is not the gate user's \(998\)", peer_uid=UID)


def test_gate_refuses_peer_process_real_uid_not_the_gate_users(gate: FakeNode) -> None:
    replace(gate, PEER, real_uid=UID)
    gate_refused("peer 50 does not run as the gate user")


def test_gate_refuses_peer_process_effective_uid_not_the_gate_users(gate: FakeNode) -> None:
    replace(gate, PEER, effective_uid=0)
    gate_refused("peer 50 does not run as the gate user")


def test_gate_refuses_peer_that_is_itself_sshd(gate: FakeNode) -> None:
    replace(gate, PEER, exe=SSHD)
    gate_refused("peer 50 is itself an sshd")


def test_gate_refuses_ancestor_not_the_gate_users(gate: FakeNode) -> None:
    # alice's own process between the monitor and a gate-user process
    gate.table[41] = proc(41, MONITOR, UID, "/usr/bin/bash", "bash", start=41.0)
    replace(gate, PEER, ppid=41)
    gate_refused("ancestor 41 of 50 is not the gate user's")


def test_gate_refuses_monitor_not_run_by_root(gate: FakeNode) -> None:
    # alice started /usr/sbin/sshd herself: her "monitor" is no root process
    replace(gate, MONITOR, real_uid=UID, effective_uid=UID)
    gate_refused("ancestor 20 of 50 is not the gate user's")


def test_gate_refuses_user_without_passwd_entry(gate: FakeNode) -> None:
    retitle(gate, MONITOR, "sshd: ghost [priv]")
    gate_refused("user 'ghost' has no passwd entry", user="ghost")


@pytest.mark.parametrize("title", [
    "sshd: [accepted]",
    "sshd-session: [accepted]",
    f"sshd: {USER}",
    f"sshd: {USER}@notty",
    f"sshd-session: {USER}@pts/0",
    f"sshd: {USER} [net]",
    f"sshd-auth: {USER} [net]",
    f"sshd-auth: {USER} [priv]",
    LISTENER_92,
    "/usr/sbin/sshd -D",
])
def test_gate_refuses_monitor_title_check_parent_not_a_monitor(gate: FakeNode, title: str) -> None:
    retitle(gate, MONITOR, title)
    gate_refused("monitor 20 is titled")


@pytest.mark.parametrize("title", [
    "sshd: bob [priv]",
    "sshd-session: bob [priv]",
    f"sshd: {USER}2 [priv]",
    f"sshd: {USER}@notty [priv]",
    f"sshd: x{USER} [priv]",
])
def test_gate_refuses_monitor_title_check_monitor_for_another_user(gate: FakeNode,
                                                                   title: str) -> None:
    retitle(gate, MONITOR, title)
    gate_refused("monitor 20 is titled")


def test_gate_refuses_monitor_title_check_user_named_like_a_session(gate: FakeNode) -> None:
    # The request names "alice@notty"; the monitor is alice's.
    gate_refused(r"monitor 20 is titled 'sshd: alice \[priv\]', not alice@notty \[priv\]",
                 user="alice@notty")


def test_gate_refuses_monitor_netns_check_another_node(gate: FakeNode) -> None:
    gate.netns[MONITOR] = OTHER_NETNS
    gate_refused("monitor 20 belongs to another node")


def test_gate_refuses_monitor_netns_check_namespace_unreadable(gate: FakeNode) -> None:
    gate.netns[MONITOR] = None
    gate_refused("monitor 20 belongs to another node")


@pytest.mark.parametrize("euid", [0, UID, PRIVSEP_UID])
def test_gate_refuses_monitor_euid_check_not_running_an_authorized_keys_command(
        gate: FakeNode, euid: int) -> None:
    replace(gate, MONITOR, effective_uid=euid)
    gate_refused("monitor 20 is not running an AuthorizedKeysCommand")


@pytest.mark.parametrize("exe", [
    "/opt/sshd", "/usr/sbin/cron", "/home/alice/usr/sbin/sshd", f"{SSHD} (deleted)", None,
])
def test_gate_refuses_monitor_exe_check_not_a_system_sshd(gate: FakeNode, exe: str | None) -> None:
    replace(gate, MONITOR, exe=exe)
    gate_refused("monitor 20 (runs|has no executable)")


def test_gate_refuses_monitor_exe_check_site_executables(gate: FakeNode) -> None:
    with pytest.raises(NotAnSshSession, match="monitor 20 runs /usr/sbin/sshd, not a system"):
        verify_gate(executables=frozenset({"/opt/openssh/sbin/sshd"}))


def test_gate_refuses_listener_uid_check_not_root(gate: FakeNode) -> None:
    replace(gate, LISTENER, real_uid=UID, effective_uid=UID)
    gate_refused("listener 10 does not run as root")


@pytest.mark.parametrize("exe", ["/usr/sbin/cron", "/usr/lib/systemd/systemd",
                                 f"{SSHD} (deleted)", None])
def test_gate_refuses_listener_exe_check_not_a_system_sshd(gate: FakeNode, exe: str | None) -> None:
    replace(gate, LISTENER, exe=exe)
    gate_refused("listener 10 (runs|has no executable)")


def test_gate_refuses_monitor_still_running_check_pid_reused(gate: FakeNode) -> None:
    gate.changed.add(MONITOR)
    gate_refused("monitor 20 changed while being verified")


@pytest.mark.parametrize("pid", [PEER, MONITOR, LISTENER])
def test_gate_refuses_a_vanished_process(gate: FakeNode, pid: int) -> None:
    del gate.table[pid]
    with pytest.raises(ProcError):
        verify_gate()


# --------------------------------------------------------------------------- verify_authenticated


def test_authenticated_accepts_the_genuine_openssh_92_child(auth: FakeNode) -> None:
    assert verify_auth() == sessions.Authenticated(
        user=USER, uid=UID, monitor=auth.table[MONITOR], child=auth.table[CHILD], connection=CONN)


def test_authenticated_accepts_the_genuine_openssh_100_child(auth: FakeNode) -> None:
    auth.table.update(auth_chain(prefix="sshd-session", exe=SSHD_SESSION))
    assert verify_auth().uid == UID


def test_authenticated_refuses_monitor_start_check_another_process(auth: FakeNode) -> None:
    with pytest.raises(NoSuchProcess, match="monitor 20 is another process"):
        verify_auth(monitor_start=19.5)


def test_authenticated_refuses_monitor_uid_check_not_root(auth: FakeNode) -> None:
    replace(auth, MONITOR, real_uid=UID, effective_uid=UID)
    auth_refused("monitor 20 does not run as root")


@pytest.mark.parametrize("exe", ["/opt/sshd", f"{SSHD} (deleted)", "/usr/bin/python3.11"])
def test_authenticated_refuses_monitor_exe_check_not_a_system_sshd(auth: FakeNode,
                                                                   exe: str) -> None:
    # the child runs the same binary, so only the monitor's exe is wrong
    replace(auth, MONITOR, exe=exe)
    replace(auth, CHILD, exe=exe)
    auth_refused("monitor 20 runs")


@pytest.mark.parametrize("title", [
    "sshd: [accepted]",
    "sshd-session: [accepted]",
    f"sshd: {USER} [net]",
    f"sshd-auth: {USER} [net]",
    f"sshd-auth: {USER} [priv]",
    f"sshd: {USER}",
    f"sshd: {USER}@notty",
    LISTENER_92,
])
def test_authenticated_refuses_monitor_title_check_no_user_named(auth: FakeNode,
                                                                 title: str) -> None:
    retitle(auth, MONITOR, title)
    auth_refused("monitor 20 is titled")


def test_authenticated_refuses_monitor_netns_check_another_node(auth: FakeNode) -> None:
    auth.netns[MONITOR] = OTHER_NETNS
    auth_refused("monitor 20 belongs to another node")


def test_authenticated_refuses_monitor_netns_check_namespace_unreadable(auth: FakeNode) -> None:
    auth.netns[MONITOR] = None
    auth_refused("monitor 20 belongs to another node")


def test_authenticated_refuses_listener_uid_check_not_root(auth: FakeNode) -> None:
    replace(auth, LISTENER, real_uid=UID, effective_uid=UID)
    auth_refused("listener 10 does not run as root")


@pytest.mark.parametrize("exe", ["/usr/lib/systemd/systemd", f"{SSHD} (deleted)", None])
def test_authenticated_refuses_listener_exe_check_not_a_system_sshd(auth: FakeNode,
                                                                    exe: str | None) -> None:
    replace(auth, LISTENER, exe=exe)
    auth_refused("listener 10 (runs|has no executable)")


def test_authenticated_refuses_listener_start_check_pid_reused(auth: FakeNode) -> None:
    replace(auth, LISTENER, start_time=25.0)
    with pytest.raises(NoSuchProcess, match="parent 10 of 20 is younger than its child"):
        verify_auth()


def test_authenticated_refuses_monitor_ppid_check_no_parent(auth: FakeNode) -> None:
    replace(auth, MONITOR, ppid=0)
    auth_refused("process 20 has no parent")


@pytest.mark.parametrize("kids", [[CHILD, 31], [31, CHILD], [31], []])
def test_authenticated_refuses_only_child_check(auth: FakeNode, kids: list[int]) -> None:
    # 31: e.g. an AuthorizedKeysCommand the monitor runs at the same time
    auth.table[31] = proc(31, MONITOR, GATE_UID, "/usr/bin/python3.11", "sshd-adopt-keys",
                          start=31.0)
    auth.kids[MONITOR] = kids
    auth_refused("monitor 20 has children")


def test_authenticated_refuses_child_ppid_check_another_parent(auth: FakeNode) -> None:
    # the kernel listed 30 under the monitor; 30's own stat names another parent
    auth.kids[MONITOR] = [CHILD]
    replace(auth, CHILD, ppid=21)
    auth_refused("process 30 is not the monitor's own sshd child")


@pytest.mark.parametrize("exe", ["/usr/lib/openssh/sshd-auth", SSHD_SESSION, "/usr/bin/sleep",
                                 f"{SSHD} (deleted)", None])
def test_authenticated_refuses_child_exe_check_not_the_monitors(auth: FakeNode,
                                                                exe: str | None) -> None:
    replace(auth, CHILD, exe=exe)
    auth_refused("process 30 is not the monitor's own sshd child")


def test_authenticated_refuses_user_without_passwd_entry(auth: FakeNode) -> None:
    # sshd titles a monitor for a nonexistent user "unknown [priv]"
    retitle(auth, MONITOR, "sshd: unknown [priv]")
    auth_refused("user 'unknown' has no passwd entry")


@pytest.mark.parametrize("real", [PRIVSEP_UID, 0, BOB])
def test_authenticated_refuses_child_real_uid_check_not_the_users(auth: FakeNode,
                                                                  real: int) -> None:
    replace(auth, CHILD, real_uid=real)
    auth_refused(f"process 30 runs as uid {real}/{UID}, not alice's")


@pytest.mark.parametrize("effective", [PRIVSEP_UID, 0, BOB])
def test_authenticated_refuses_child_effective_uid_check_not_the_users(auth: FakeNode,
                                                                       effective: int) -> None:
    replace(auth, CHILD, effective_uid=effective)
    auth_refused(f"process 30 runs as uid {UID}/{effective}, not alice's")


def test_authenticated_refuses_root_uid_check_root_login(auth: FakeNode) -> None:
    retitle(auth, MONITOR, "sshd: root [priv]")
    replace(auth, CHILD, real_uid=0, effective_uid=0)
    auth_refused("process 30 runs as uid 0/0, not root's")


def test_authenticated_refuses_not_users_check_privsep_user(auth: FakeNode) -> None:
    retitle(auth, MONITOR, "sshd: sshd [priv]")
    replace(auth, CHILD, real_uid=PRIVSEP_UID, effective_uid=PRIVSEP_UID)
    assert verify_auth().uid == PRIVSEP_UID
    auth_refused("process 30 runs as uid 101/101, not sshd's",
                 not_users=frozenset({PRIVSEP_UID}))


@pytest.mark.parametrize("root", ["/run/sshd", "/var/empty", None])
def test_authenticated_refuses_root_dir_check_chrooted_child(auth: FakeNode,
                                                             root: str | None) -> None:
    auth.roots[CHILD] = root
    auth_refused("process 30 is chrooted")


@pytest.mark.parametrize("pid", [MONITOR, CHILD])
def test_authenticated_refuses_unchanged_check_changed_meanwhile(auth: FakeNode, pid: int) -> None:
    auth.changed.add(pid)
    with pytest.raises(NoSuchProcess, match=f"process {pid} .* while the session"):
        verify_auth()


@pytest.mark.parametrize("pid", [MONITOR, CHILD, LISTENER])
def test_authenticated_refuses_a_vanished_process(auth: FakeNode, pid: int) -> None:
    auth.kids[MONITOR] = [CHILD]  # listed by the kernel, gone when read
    del auth.table[pid]
    with pytest.raises(ProcError):
        verify_auth()


# --------------------------------------------------------------------------- titles


@pytest.mark.parametrize(("cmdline", "user"), [
    (("sshd:", "alice", "[priv]", "", ""), "alice"),  # 9.2: NUL padded, split by psutil
    (("sshd-session: alice [priv]" + " " * 40,), "alice"),  # 10.0: one space-padded argument
    (("sshd:", "alice@notty", "[priv]"), "alice@notty"),  # the account "alice@notty"
    (("sshd:", "[listener]", "[priv]"), "[listener]"),
    # 10.5+ (Debian forky's 10.6): the monitor retitles itself once the user authenticated
    (("sshd-session: alice [postauth]" + " " * 40,), "alice"),
])
def test_monitor_user_reads_the_padded_92_and_100_titles(cmdline: tuple[str, ...],
                                                         user: str) -> None:
    info = dataclasses.replace(proc(MONITOR, LISTENER, 0, SSHD, "x"), cmdline=cmdline)
    assert sessions.monitor_user(info.title) == user


@pytest.mark.parametrize("title", [
    "sshd: alice@notty",
    "sshd: alice@pts/0",
    "sshd-session: alice@notty",
    "sshd: alice",
    "sshd: [accepted]",
    "sshd: alice [net]",
    "sshd-auth: alice [net]",
    "sshd-auth: alice [priv]",
    LISTENER_92,
    "/usr/sbin/sshd -D",
    "xsshd: alice [priv]",
    "sshd: alice [priv] x",
    "sshd: alice [priv]@notty",
    "sshd: alice bob [priv]",
    "sshd:  alice [priv]",
    "sshd: [priv]",
    "python3 sshd: alice [priv]",
    "sshd-session: alice [postauth] x",
    "sshd-session: alice [pam]",
    "sshd-auth: alice [postauth]",
])
def test_monitor_user_fullmatch_refuses_other_titles(title: str) -> None:
    assert sessions.monitor_user(title) is None


@pytest.mark.parametrize("title", [
    "sshd: alice@notty",
    "sshd: alice@pts/0",
    "sshd: alice@pts/0,pts/3",
    "sshd: alice",
    "sshd-session: alice@notty",
    "sshd-session: alice@pts/1",
    "sshd-session: alice",
])
def test_is_session_title_accepts_92_and_100_sessions(title: str) -> None:
    assert sessions.is_session_title(title, USER)


@pytest.mark.parametrize("title", [
    "sshd: alice [priv]",
    "sshd-session: alice [priv]",
    "sshd: alice2@notty",
    "sshd: alice2",
    "sshd: alic@notty",
    "sshd: bob@notty",
    "sshd: alice [net]",
    "sshd-auth: alice [net]",
    "sshd-auth: alice@notty",
    "sshd: [accepted]",
    LISTENER_92,
    "xsshd: alice@notty",
    "alice@notty",
    "sshd:alice@notty",
])
def test_is_session_title_refuses_other_titles(title: str) -> None:
    assert not sessions.is_session_title(title, USER)


def test_is_session_title_at_sign_check_user_named_with_an_at_sign() -> None:
    assert sessions.is_session_title("sshd: alice@notty@notty", "alice@notty")
    assert sessions.is_session_title("sshd-session: alice@notty", "alice@notty")
    assert not sessions.is_session_title("sshd: alice@notty [priv]", "alice@notty")
    assert not sessions.is_session_title("sshd: alice@notty", "alice@not")


def test_is_session_title_user_named_like_a_session_is_not_alices() -> None:
    assert not sessions.is_session_title("sshd: alice@notty [priv]", USER)


@pytest.mark.parametrize("title", [
    LISTENER_92,
    LISTENER_100,
    "sshd: /usr/sbin/sshd -D -o MaxStartups=10:30:100 [listener] 3 of 10-100 startups",
])
def test_is_listener_title_accepts_92_and_100_listeners(title: str) -> None:
    assert sessions.is_listener_title(title)


@pytest.mark.parametrize("title", [
    "/usr/sbin/sshd -D",  # argv before setproctitle: not recognised as a listener
    "python3 [listener] 0 of 10-100 startups",
    "sshd: alice [priv]",
    "sshd-session: alice [priv]",
    "sshd: alice@notty",
    "sshd: [accepted]",
])
def test_is_listener_title_refuses_other_titles(title: str) -> None:
    assert not sessions.is_listener_title(title)


@pytest.mark.parametrize("title", [
    "sshd: [listener] [priv]",
    "sshd-session: x[listener] [priv]",
    "sshd: [listener]@notty",
])
def test_is_listener_title_user_named_like_a_listener(title: str) -> None:
    assert not sessions.is_listener_title(title)


# --------------------------------------------------------------------------- check_root_sshd


@pytest.mark.parametrize("exe", sorted(EXECUTABLES))
def test_check_root_sshd_accepts_root_system_sshd(exe: str) -> None:
    sessions.check_root_sshd(proc(MONITOR, LISTENER, 0, exe, "sshd: alice [priv]"), EXECUTABLES,
                             "monitor")


def test_check_root_sshd_checks_only_the_real_uid() -> None:
    # while an AuthorizedKeysCommand runs, the monitor's effective uid is the command user's
    info = proc(MONITOR, LISTENER, 0, SSHD, "sshd: alice [priv]", euid=GATE_UID)
    sessions.check_root_sshd(info, EXECUTABLES, "monitor")


@pytest.mark.parametrize("uid", [UID, PRIVSEP_UID])
def test_check_root_sshd_uid_check_refuses_non_root(uid: int) -> None:
    info = proc(MONITOR, LISTENER, uid, SSHD, "sshd: alice [priv]", euid=0)
    with pytest.raises(NotAnSshSession, match="watcher 20 does not run as root"):
        sessions.check_root_sshd(info, EXECUTABLES, "watcher")


@pytest.mark.parametrize(("exe", "why"), [
    (None, "has no executable"),
    (f"{SSHD} (deleted)", "replaced or removed on disk"),
    (f"{SSHD_SESSION} (deleted)", "replaced or removed on disk"),
    ("/usr/local/sbin/sshd", "not a system sshd"),
    ("/tmp/usr/sbin/sshd", "not a system sshd"),
    ("/usr/sbin/sshd2", "not a system sshd"),
    ("/usr/lib/openssh/sshd-auth", "not a system sshd"),
])
def test_check_root_sshd_exe_check_refuses(exe: str | None, why: str) -> None:
    info = proc(LISTENER, 1, 0, exe, LISTENER_92)
    with pytest.raises(NotAnSshSession, match=f"listener 10 .*{why}"):
        sessions.check_root_sshd(info, EXECUTABLES, "listener")


def test_check_root_sshd_exe_check_uses_the_given_executables() -> None:
    site = frozenset({"/opt/openssh/sbin/sshd"})
    sessions.check_root_sshd(proc(LISTENER, 1, 0, "/opt/openssh/sbin/sshd", LISTENER_92), site,
                             "listener")
    with pytest.raises(NotAnSshSession, match="not a system sshd"):
        sessions.check_root_sshd(proc(LISTENER, 1, 0, SSHD, LISTENER_92), site, "listener")


# --------------------------------------------------------------------------- find_session titles


def session_chain(user: str, uid: int, *, monitor: str | None = None,
                  session: str | None = None) -> dict[int, ProcInfo]:
    """find_session's chain: listener 10, monitor 20, session 30, wrapper 40."""
    return {
        1: proc(1, 0, 0, "/sbin/init", "init", start=1.0),
        LISTENER: proc(LISTENER, 1, 0, SSHD, LISTENER_92, start=10.0),
        MONITOR: proc(MONITOR, LISTENER, 0, SSHD, monitor or f"sshd: {user} [priv]", start=20.0),
        CHILD: proc(CHILD, MONITOR, uid, SSHD, session or f"sshd: {user}@notty", start=30.0),
        40: proc(40, CHILD, uid, "/usr/bin/python3.11", "python3 /usr/bin/sshd-adopt",
                 start=40.0),
    }


def test_find_session_accepts_a_user_named_with_an_at_sign(monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    install(monkeypatch, session_chain("alice@notty", ODD_UID))
    found = sessions.find_session(40, ODD_UID)
    assert (found.user, found.monitor_pid, found.session_pid) == ("alice@notty", 20, 30)


def test_find_session_accepts_space_padded_100_titles(monkeypatch: pytest.MonkeyPatch) -> None:
    node = install(monkeypatch, session_chain(USER, UID))
    for pid, title in ((MONITOR, f"sshd-session: {USER} [priv]"),
                       (CHILD, f"sshd-session: {USER}@notty")):
        replace(node, pid, exe=SSHD_SESSION, cmdline=(title + " " * 30,))
    assert sessions.find_session(40, UID).chain == (20, 30, 40)


def test_find_session_monitor_title_check_user_named_like_alices_session(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # alice's processes under the monitor of the account "alice@notty"
    install(monkeypatch, session_chain(USER, UID, monitor="sshd: alice@notty [priv]"))
    with pytest.raises(NotAnSshSession, match=r"monitor 20 is titled 'sshd: alice@notty \[priv\]'"):
        sessions.find_session(40, UID)


@pytest.mark.parametrize("title", [
    f"sshd: {USER}",
    f"sshd: {USER} [priv]",
    f"sshd-session: {USER} [priv]",
    f"sshd-auth: {USER}@notty",
    f"sshd: {USER} [net]",
])
def test_find_session_session_title_check_refuses_non_session_titles(
        monkeypatch: pytest.MonkeyPatch, title: str) -> None:
    install(monkeypatch, session_chain(USER, UID, session=title))
    with pytest.raises(NotAnSshSession, match="session process 30 is titled"):
        sessions.find_session(40, UID)


@pytest.mark.parametrize("title", [
    f"sshd-auth: {USER} [priv]",
    f"sshd: {USER}@notty",
    "sshd: [accepted]",
    LISTENER_92,
])
def test_find_session_monitor_title_check_refuses_non_monitor_titles(
        monkeypatch: pytest.MonkeyPatch, title: str) -> None:
    install(monkeypatch, session_chain(USER, UID, monitor=title))
    with pytest.raises(NotAnSshSession, match="monitor 20 is titled"):
        sessions.find_session(40, UID)
