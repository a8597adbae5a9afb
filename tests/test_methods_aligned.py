"""Every train_<method>.py equals train_vanilla.py outside its `# >>> method` ... `# <<< method` slots."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOT = re.compile(r'^[ \t]*# >>> method: (.*)\n(?:.*\n)*?[ \t]*# <<< method\n', re.M)


def outside_slots(path):
    text = open(path).read()
    return SLOT.sub(lambda m: f'<slot {m.group(1)}>\n', text), SLOT.findall(text)


SCRIPTS = sorted(p for p in glob.glob(os.path.join(ROOT, 'train_*.py')) if not p.endswith('train_vanilla.py'))


@pytest.mark.parametrize('path', SCRIPTS, ids=os.path.basename)
def test_only_the_slots_differ(path):
    base, base_slots = outside_slots(os.path.join(ROOT, 'train_vanilla.py'))
    other, other_slots = outside_slots(path)
    assert other_slots == base_slots            # same slots, same order
    assert other == base                        # and nothing else differs


def test_the_check_bites():
    """A change outside a slot is caught; a change inside one is not."""
    base, _ = outside_slots(os.path.join(ROOT, 'train_vanilla.py'))
    text = open(os.path.join(ROOT, 'train_vanilla.py')).read()
    assert SLOT.sub(lambda m: f'<slot {m.group(1)}>\n', text.replace('opt.step()', 'opt.step(); pass')) != base
    inside = text.replace("config['method'] = 'vanilla'", "config['method'] = 'other'")
    assert SLOT.sub(lambda m: f'<slot {m.group(1)}>\n', inside) == base
    assert len(SCRIPTS) >= 1
