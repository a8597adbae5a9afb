"""The front page cannot drift from the code: the README's marked CPU commands run, and every link resolves.

Commands. A ```bash block of README.md right after a comment `<!-- test: SPEC -->` is run in a temporary folder
that holds a copy of the repository's top-level files (the scripts and requirements; no data, runs or docs), with
this interpreter. SPEC is a `;`-separated list of clauses:

    SCRIPT += ARGS     append ARGS to every command of the block that runs SCRIPT (e.g. `train_vanilla.py +=
                       --max-steps 4`: a later flag overrides the preset's, so the demo runs 4 steps, not 1000;
                       the demo's marker also passes --sample-every 0, as its preview grid alone costs ~40 s of CPU
                       time, and tests/test_train.py checks the previews)
    expect PATH        PATH (relative to the folder) must not exist before the block and must exist after it
    toy-networks DIR   first make a small toy set at DIR with a toy teacher and a toy FD network trained for a
                       few steps (the toy lab would otherwise train them for minutes before its own steps)

How a block's commands are run, so the test stays fast (the demo's block took 35 s, 23 s of CPU time,
on 2 cores shared with other jobs):
- `python3 -m venv ...` and `pip install ...` are skipped: the test runs in the environment that runs the tests.
- `python`, `python3`, `.venv/bin/python X.py ...` run as this interpreter.
- `torchrun [flags] X.py ...` (also `.venv/bin/torchrun`) runs X.py as ONE plain process: the torchrun flags are
  dropped (the scripts train without torchrun; the 2-process paths have their own tests).
- Commands are split at `&&` and at line ends (`\\` continues a line); `#` starts a comment. Anything else in a
  marked block (shell constructs, other programs) fails the test, so only mark blocks of these commands.
A clause that names a script the block does not run fails too, so the overrides follow the README.
The toy lab's block is marked `<!-- test: toy-networks data/toy; lab.py += --steps 4 ...; expect
runs/lab/toy_lab.png -->`.

Links. Every relative link in README.md and docs/*.md must point to an existing file, and an `#anchor` to a heading
of the target page (GitHub's slugs); every docs/*.md page must be linked from README.md.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKED = re.compile(r'^<!-- test: (.*?) -->\n(?:[ \t]*\n)*```(?:bash|sh)\n(.*?)^```', re.M | re.S)
FENCE = re.compile(r'^```.*?^```', re.M | re.S)
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


# -----------------------------------------------------------------------------
# commands

def parse_spec(spec):
    """'a.py += --x 1; expect p' -> ({'a.py': ['--x', '1']}, ['p'], []); 'toy-networks DIR' adds DIR to the third"""
    extra, expect, toy = {}, [], []
    for clause in filter(None, (c.strip() for c in spec.split(';'))):
        if clause.startswith('expect '):
            expect.append(clause[len('expect '):].strip())
        elif clause.startswith('toy-networks '):
            toy.append(clause[len('toy-networks '):].strip())
        elif '+=' in clause:
            script, args = clause.split('+=', 1)
            extra[script.strip()] = shlex.split(args)
        else:
            raise ValueError(f'unknown clause {clause!r} in <!-- test: {spec} -->')
    return extra, expect, toy


def quick_toy_networks(path):
    """A small toy set at PATH with a toy teacher and a toy FD network trained for seconds, not minutes, so a block
    that would train them first (the toy lab's) runs its own steps only; tests/test_lab.py makes the same."""
    import numpy as np
    sys.path.insert(0, ROOT)
    import prepare
    prepare.prepare_toy(path, per_class=12, resolution=16, seed=0)
    prepare.prepare_toy_teacher(path, seed=0, epochs=1, batch_size=40)
    net = prepare.train_toy_fd(seed=1, per_class=20, epochs=1, log=lambda s: None)
    prepare._save_net(net, os.path.join(path, 'fd.safetensors'), dict(width=16, classes=10, resolution=16))
    np.savez(os.path.join(path, 'fd_ref.npz'), arr_0=prepare.draw_toy_set(10, 16, seed=2)[0].transpose(0, 2, 3, 1))


def block_commands(block, extra):
    """The block's commands as argv lists for this interpreter (see the module docstring), overrides appended."""
    commands, used = [], set()
    for line in block.replace('\\\n', ' ').splitlines():
        for part in line.split('&&'):
            argv = shlex.split(part, comments=True)
            if not argv:
                continue
            prog = os.path.basename(argv[0])
            if prog == 'pip' or argv[1:3] == ['-m', 'venv'] or argv[1:3] == ['-m', 'pip']:
                continue                                                     # the test's own environment
            if prog in ('python', 'python3'):
                argv = argv[1:]
            elif prog == 'torchrun':                                         # one process, torchrun flags dropped
                scripts = [i for i, a in enumerate(argv) if a.endswith('.py')]
                assert scripts, f'no script in {part.strip()!r}'
                argv = argv[scripts[0]:]
            else:
                raise AssertionError(f'unsupported command in a tested README block: {part.strip()!r}')
            script = argv[0] if argv and argv[0].endswith('.py') else None
            if script in extra:
                argv, used = argv + extra[script], used | {script}
            commands.append([sys.executable, *argv])
    unused = set(extra) - used
    assert not unused, f'the README block runs no {sorted(unused)}, but its test comment overrides it'
    return commands


def marked_blocks(text):
    return [(spec, block) for spec, block in MARKED.findall(text)]


def test_the_parser_follows_the_rules():
    """The conversion itself: skipped installs, torchrun as one process, overrides appended, bad clauses refused."""
    text = ('<!-- test: b.py += --max-steps 4; expect out/x.png -->\n\n```bash\n'
            'python3 -m venv .venv && .venv/bin/pip install -r r.txt && .venv/bin/python a.py --k 1 && '
            '.venv/bin/torchrun --nproc_per_node=2 b.py \\\n    --preset toy   # a comment\n```\n'
            '```bash\npython c.py\n```\n')
    (spec, block), = marked_blocks(text)                                    # the unmarked block is not run
    extra, expect, toy = parse_spec(spec)
    assert expect == ['out/x.png'] and toy == []
    assert block_commands(block, extra) == [[sys.executable, 'a.py', '--k', '1'],
                                            [sys.executable, 'b.py', '--preset', 'toy', '--max-steps', '4']]
    with pytest.raises(AssertionError, match='runs no'):
        block_commands('python a.py\n', {'b.py': ['--x']})
    with pytest.raises(AssertionError, match='unsupported'):
        block_commands('ls runs\n', {})
    with pytest.raises(ValueError, match='unknown clause'):
        parse_spec('b.py --max-steps 4')


README_BLOCKS = marked_blocks(open(os.path.join(ROOT, 'README.md')).read())


def test_the_demo_and_the_lab_are_marked():
    """The quick start's demo and the toy lab are among the tested blocks (a lost marker would test nothing)."""
    assert any('train_vanilla.py --preset toy' in block for _, block in README_BLOCKS)
    assert any('lab.py' in block for _, block in README_BLOCKS)


@pytest.mark.parametrize('spec,block', README_BLOCKS, ids=[s for s, _ in README_BLOCKS])
def test_readme_commands_run(spec, block, tmp_path):
    extra, expect, toy = parse_spec(spec)
    commands = block_commands(block, extra)
    for name in os.listdir(ROOT):                                            # the top-level files only
        if os.path.isfile(os.path.join(ROOT, name)) and not name.startswith('.'):
            shutil.copy2(os.path.join(ROOT, name), tmp_path / name)
    for path in expect:
        assert not (tmp_path / path).exists(), f'{path} exists before the block runs'
    for path in toy:
        quick_toy_networks(str(tmp_path / path))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    for argv in commands:
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f'{" ".join(argv[1:])} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}'
    for path in expect:
        assert (tmp_path / path).is_file(), f'{path} was not written; the folder holds {sorted(os.listdir(tmp_path))}'


# -----------------------------------------------------------------------------
# links

def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r'[`*]', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(text):
    seen, out = {}, set()
    for line in FENCE.sub('', text).splitlines():
        m = re.match(r'#{1,6} (.*)', line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f'{s}-{seen[s]}')
            seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(path):
    """The relative links of one markdown file that point nowhere: [(target, why)]."""
    text = open(path).read()
    prose = re.sub(r'`[^`\n]*`', '', FENCE.sub('', text))                  # no links inside code
    bad = []
    for target in LINK.findall(prose):
        if re.match(r'[a-z]+:', target):                                     # https:, mailto:
            continue
        file, _, anchor = target.partition('#')
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            bad.append((target, 'no such file'))
        elif anchor and (not dest.endswith('.md') or anchor not in anchors(open(dest).read())):
            bad.append((target, 'no such heading'))
    return bad


PAGES = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


@pytest.mark.parametrize('path', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_resolve(path):
    assert broken_links(path) == []


def test_every_page_is_linked_from_the_readme():
    readme = open(os.path.join(ROOT, 'README.md')).read()
    linked = {os.path.normpath(os.path.join(ROOT, t.partition('#')[0])) for t in LINK.findall(readme)}
    assert [p for p in PAGES[1:] if p not in linked] == []
    assert len(PAGES) > 1


def test_the_link_check_bites(tmp_path):
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'a.md').write_text('# A page\n\n## Two words, one comma\n\n```\n# not a heading\n```\n')
    (tmp_path / 'README.md').write_text(
        '[ok](docs/a.md) [ok](docs/a.md#two-words-one-comma) [ok](#top) [bad](docs/b.md) '
        '[bad](docs/a.md#not-a-heading) [web](https://example.com) `[code](nowhere.md)`\n\n# Top\n')
    assert broken_links(str(tmp_path / 'README.md')) == [('docs/b.md', 'no such file'),
                                                         ('docs/a.md#not-a-heading', 'no such heading')]
