"""``twinkle env``: the facts a bug report needs, in one table."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

OPTIONAL_PACKAGES = ('triton', 'liger-kernel', 'torch-npu', 'flash-attn', 'kernels', 'vllm',
                     'megatron-core', 'ray', 'transformers', 'peft', 'numpy')


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


def env_report() -> str:
    import torch

    from twinkle import backends, kernels
    from twinkle.backends.cpu import applied_tuning

    device = backends.current()
    lines = [f'twinkle      {_version("twinkle")}', f'python       {platform.python_version()}',
             f'torch        {torch.__version__}', f'platform     {platform.platform()}', '', 'device']
    lines += [f'  {key:<20} {value}' for key, value in device.describe().items()]
    lines += [f'  {"cpu tuning":<20} {applied_tuning() or "none"}', f'  {"intra-op threads":<20} '
              f'{torch.get_num_threads()}', '', 'packages']
    lines += [f'  {name:<20} {_version(name)}' for name in OPTIONAL_PACKAGES]
    lines += ['', 'kernels (op, chosen backend, reason; then every backend)']
    for row in kernels.report():
        lines.append(f'  {row["op"]:<28} {row["backend"]:<10} {row["reason"]}')
        lines += [f'      {name:<12} {state}' for name, state in row['backends'].items()]
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='twinkle')
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('env', help='print device, packages and kernel choices')
    args = parser.parse_args(argv)
    if args.command == 'env':
        print(env_report())
    return 0


if __name__ == '__main__':
    sys.exit(main())
