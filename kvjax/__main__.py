"""`python -m kvjax demo ...`: the decoding demo (see kvjax/demo.py)."""

import sys


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] != "demo":
    print("usage: python -m kvjax demo [options]   (python -m kvjax demo --help)")
    return 2
  from kvjax import demo
  return demo.main(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
