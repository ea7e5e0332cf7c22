"""A switched host's failure, told with its cause where its master knows it: a
health check nobody answered says what the release's workers did (crashes, their
last lines) and, when the signs are there, that they must serve the socket the
master hands them instead of binding their own."""

from __future__ import annotations

from deployer.errors import DeployerError, StepFailed
from deployer.hostapi import answers, calls
from deployer.remote import RemoteHost

LAST_LINES = 6  # of the workers' output, shown with the failure
FD3_HINT = (
    "an app under the master must serve the socket it inherits as fd 3 (LISTEN_FDS=1), "
    "not bind its own"
)
ADDRESS_IN_USE = "Address already in use"
NO_ANSWER = "no answer"  # agent/ops/probes.py: a probe that got no HTTP answer at all


def with_cause(
    remote: RemoteHost, roles: list[str | None], release: str, error: StepFailed
) -> StepFailed:
    """`error` (a failed reload, health check or watch of `release` on `remote`)
    with what the masters of `roles` saw of its workers; `error` itself if none
    could say."""
    if error.step.startswith("master "):
        return _with_hint(remote, roles, error)
    parts = [_role_part(remote, role, release, error.reason) for role in roles]
    said = "\n".join(p for p in parts if p)
    if not said:
        return error
    return StepFailed(error.host, error.step, f"{error.reason}\n{said}", error.exit_code)


def _with_hint(remote: RemoteHost, roles: list[str | None], error: StepFailed) -> StepFailed:
    """A master start or reload that failed on workers that could not bind: the hint
    (their stderr is in the message already)."""
    masters = [remote.master_for(role) for role in roles]
    listens = any(m is not None and m.listen is not None for m in masters)
    if not (listens and ADDRESS_IN_USE in error.reason):
        return error
    return StepFailed(error.host, error.step, f"{error.reason}\n  {FD3_HINT}", error.exit_code)


def _role_part(remote: RemoteHost, role: str | None, release: str, reason: str) -> str:
    master = remote.master_for(role)
    if master is None:
        return ""
    call = calls.workers(str(master.socket), release, LAST_LINES, role)
    try:
        report: answers.WorkerReport = remote.call(call)
    except DeployerError:  # no master to ask (it stopped): the failure says enough
        return ""
    who = "" if role is None else f"{role}: "
    lines = [f"  {who}{_account(report)}"]  # indented: under the line naming the host
    lines += [f"    {line}" for line in report.lines]
    if report.listen is not None and _not_serving(report, reason):
        lines.append(f"  {FD3_HINT}")
    return "\n".join(lines)


def _account(r: answers.WorkerReport) -> str:
    if r.crashes:
        did = f"the workers of {r.release} exited {r.crashes} time(s), last {r.last_crash}"
    else:
        did = f"no worker of {r.release} exited ({r.ready} of {r.configured} ready)"
    return did + ("; their last lines:" if r.lines else "; they wrote nothing")


def _not_serving(r: answers.WorkerReport, reason: str) -> bool:
    """Signs that the workers do not serve the inherited socket: one could not bind
    its own address, or they run and nobody answers on the master's."""
    if any(ADDRESS_IN_USE in line for line in r.lines):
        return True
    return NO_ANSWER in reason and r.ready > 0 and not r.crashes
