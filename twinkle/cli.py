"""``twinkle env``: the facts a bug report needs, in one table; ``twinkle serve``: the training service."""
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
    """The report; a section that fails (a bad TWINKLE_* variable, a broken driver) prints its
    error in place of its rows: this is what users paste into bug reports, so it never crashes."""
    import torch

    lines = [f'twinkle      {_version("twinkle")}', f'python       {platform.python_version()}',
             f'torch        {torch.__version__}', f'platform     {platform.platform()}']
    for title, section in (('device', _device_lines), ('packages', _package_lines),
                           ('kernels (op, chosen backend, reason; then every backend)', _kernel_lines)):
        lines += ['', title]
        try:
            lines += section()
        except Exception as error:  # noqa: BLE001 - report it, keep going
            lines.append(f'  ERROR {type(error).__name__}: {error}')
    return '\n'.join(lines)


def _device_lines() -> list:
    import torch

    from twinkle import backends
    from twinkle.backends.cpu import applied_tuning
    device = backends.current()
    lines = [f'  {key:<20} {value}' for key, value in device.describe().items()]
    return lines + [f'  {"cpu tuning":<20} {applied_tuning() or "none"}',
                    f'  {"intra-op threads":<20} {torch.get_num_threads()}']


def _package_lines() -> list:
    return [f'  {name:<20} {_version(name)}' for name in OPTIONAL_PACKAGES]


def _kernel_lines() -> list:
    from twinkle import kernels
    lines = []
    for row in kernels.report():
        lines.append(f'  {row["op"]:<28} {row["backend"]:<10} {row["reason"]}')
        lines += [f'      {name:<12} {state}' for name, state in row['backends'].items()]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='twinkle')
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('env', help='print device, packages and kernel choices')
    from twinkle.server.main import add_serve_arguments, serve
    add_serve_arguments(commands.add_parser('serve', help='serve multi-tenant LoRA training over HTTP (extra "server")'))
    args = parser.parse_args(argv)
    if args.command == 'env':
        print(env_report())
    elif args.command == 'serve':
        return serve(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
