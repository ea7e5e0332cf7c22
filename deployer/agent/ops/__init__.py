"""Host operations. Each returns its typed answer (hostapi.answers) or raises AgentError.

Standard library only: this runs on the hosts from the zipapp `deployer setup`
uploads. Nothing that serves traffic changes before `switch`: a release is
built under a temporary name and renamed into place only when complete. One
module per concern; the names are re-exported here, for the agent's CLI.
"""

from deployer.agent.ops.common import (  # noqa: F401
    AgentError,
    _git,
)
from deployer.agent.ops.day2 import (  # noqa: F401
    _LOG_STAMP,
    LOG_ALIVE_S,
    LOG_BLOCK,
    LOG_DRAIN_S,
    LOG_MAX_LINE,
    _backlog,
    _complete_end,
    _follow,
    _ino,
    _open_log,
    _stamp,
    _stdin_closed,
    _Tail,
    app_env,
    exec_in_current,
    logs,
)
from deployer.agent.ops.lock import (  # noqa: F401
    _read_owner,
    _stale,
    _take_over,
    lock,
)
from deployer.agent.ops.probes import (  # noqa: F401
    WATCH_POLL,
    _check_master,
    _Deadline,
    _master_status,
    _master_summary,
    _probe,
    deadline,
    health,
    status,
    watch,
)
from deployer.agent.ops.release import (  # noqa: F401
    _build,
    _disk_full,
    _extract,
    _in_release,
    _link_shared,
    _revision,
    check_layout,
    current_release,
    have,
    master_state,
    prepare,
    prune,
    receive,
    receive_and_prepare,
    record,
    releases,
    state,
    switch,
)
from deployer.agent.ops.secrets import (  # noqa: F401
    _ENV_NAME,
    secrets,
)
from deployer.agent.ops.setup import (  # noqa: F401
    WRAPPER,
    _config_changes,
    _own_zipapp,
    setup,
    wrapper_script,
)
from deployer.agent.ops.units import (  # noqa: F401
    LINGER_DIR,
    SYSTEMD_ROOT_ENV,
    _host_master_config,
    _linger,
    _remove_unit,
    _start_unit,
    _Systemd,
    _systemd_booted,
    _unit_record,
    _write_record,
    boot_status,
    unit,
)
