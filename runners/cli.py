"""run_suite command line."""
def main():
    raise SystemExit(0)
