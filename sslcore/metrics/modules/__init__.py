"""Local `evaluate` modules, one folder per metric (a package so that wheels ship the scripts)."""
