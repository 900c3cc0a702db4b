"""`python -m convnext_deploy ...` is the `convnext-deploy` command."""
import sys

from convnext_deploy.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
