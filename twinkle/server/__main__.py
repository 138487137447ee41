import argparse
import sys

from .main import add_serve_arguments, serve

if __name__ == '__main__':
    sys.exit(serve(add_serve_arguments(argparse.ArgumentParser(prog='python -m twinkle.server')).parse_args()))
