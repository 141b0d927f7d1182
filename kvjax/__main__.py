"""`python -m kvjax demo ...` (kvjax/demo.py) and `python -m kvjax
calibrate ...` (kvjax/calibrate.py)."""

import sys

USAGE = ("usage: python -m kvjax demo [options]       (python -m kvjax demo --help)\n"
         "       python -m kvjax calibrate --bits B  (python -m kvjax calibrate --help)")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["demo"]:
    from kvjax import demo
    return demo.main(argv[1:])
  if argv[:1] == ["calibrate"]:
    from kvjax import calibrate
    return calibrate.main(argv[1:])
  print(USAGE)
  return 2


if __name__ == "__main__":
  sys.exit(main())
