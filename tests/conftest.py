import os
import sys

# the repo is a flat folder of scripts: make `import sit`, `import train_vanilla`, ... work from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
