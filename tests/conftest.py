import sys
from pathlib import Path

# Lets test modules in subfolders `from tiny_models import ...`.
sys.path.insert(0, str(Path(__file__).parent))
