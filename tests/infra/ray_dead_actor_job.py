"""Driver for the dead-actor test: kills rank 1 of a group during a call and reports what it saw.

    python tests/infra/ray_dead_actor_job.py OUT_JSON
"""
import json
import os
import signal
import sys
import time

from ray import cloudpickle

import twinkle
from twinkle import DeviceGroup
from twinkle.infra import RemoteGroupError

sys.path.insert(0, os.path.dirname(__file__))
import ray_components  # noqa: E402

cloudpickle.register_pickle_by_value(ray_components)


def main(out):
    twinkle.initialize(mode='ray', groups=[DeviceGroup('victims', ranks=2, device_type='cpu')], call_timeout=120)
    probe = ray_components.Probe(remote_group='victims')
    pids = [where['pid'] for where in probe.remote_apply(ray_components.Probe.where)]
    pending = probe.sleep(60)  # lazy: both ranks sleep
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    report = {'pids': pids, 'driver': os.getpid()}
    try:
        pending.result()
        report['error'] = None
    except RemoteGroupError as error:
        report['error'] = str(error)
    report['seconds_to_error'] = time.monotonic() - killed_at
    try:
        probe.where()
    except RemoteGroupError as error:
        report['later_call'] = str(error)
    with open(out, 'w') as handle:
        json.dump(report, handle)


if __name__ == '__main__':
    main(sys.argv[1])
