"""What every job script the tests launch under torchrun ends with: all ranks meet, then the process
group is torn down, so no rank exits while a peer is still in a collective or with gloo's threads
alive ("terminate called without an active exception"). After a failure there is no meeting."""
import datetime
import sys

import torch.distributed as dist

TEARDOWN_TIMEOUT = datetime.timedelta(seconds=120)


def teardown(succeeded: bool) -> None:
    if not dist.is_initialized():
        return
    if succeeded:
        try:
            if dist.get_backend() == 'gloo':
                dist.monitored_barrier(timeout=TEARDOWN_TIMEOUT)  # names a rank that never arrives
            else:
                dist.barrier()
        except RuntimeError as error:  # a job that tested a timed-out collective left the group broken
            print(f'teardown: ranks could not meet ({str(error).splitlines()[0]}); destroying the group',
                  file=sys.stderr)
    dist.destroy_process_group()


def run(main, *args, **kwargs) -> None:
    succeeded = False
    try:
        main(*args, **kwargs)
        succeeded = True
    finally:
        teardown(succeeded)
