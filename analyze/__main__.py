"""`python -m analyze` runs the trainaudit CLI."""
from analyze.cli import main

if __name__ == "__main__":
    main()
