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


def test_method_diffs_stay_small_and_the_docs_give_their_size():
    """Each method's diff of its parent (GNU diff's changed lines, docstrings included) is at most 60 lines, and
    docs/methods.md states the sizes as they are."""
    import subprocess

    def changed(a, b):
        out = subprocess.run(['diff', os.path.join(ROOT, a), os.path.join(ROOT, b)], capture_output=True, text=True)
        return sum(line[:1] in '<>' for line in out.stdout.splitlines())
    n = {b: changed(a, b) for a, b in (('train_vanilla.py', 'train_repa.py'), ('train_repa.py', 'train_haste.py'),
                                      ('train_repa.py', 'train_reg.py'), ('train_vanilla.py', 'train_carflow.py'))}
    assert max(n.values()) <= 60, n
    doc = open(os.path.join(ROOT, 'docs', 'methods.md')).read()
    said = (f"({n['train_haste.py']}, {n['train_reg.py']} and {n['train_carflow.py']} changed lines; REPA's diff of "
            f"vanilla has {n['train_repa.py']})")
    assert said in ' '.join(doc.split()), said
