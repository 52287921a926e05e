# The log builders live next to these tests; make them importable whatever pytest's import mode is.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
