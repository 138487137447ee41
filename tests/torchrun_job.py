"""What every job script the tests launch under torchrun ends with: the process group torn down, even
after a failure, so ranks never abort at exit ("terminate called without an active exception")."""
import torch.distributed as dist


def run(main, *args, **kwargs) -> None:
    try:
        main(*args, **kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
