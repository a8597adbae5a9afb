"""
evaluate.py: score every checkpoint of one or more training runs under one recorded protocol (sample.py's
sampler, fid.py's metrics), and draw any metric against training step and images seen, with a markdown table.

  usage: evaluate.py RUN [RUN ...] --ref REF [options] [sample.py's sampler flags]     (run folders come first)
         evaluate.py RUN [RUN ...] --plot [--metric fid] [--out FIG.png]

  # the papers' convergence curves: 10K samples at every checkpoint under REPA's no-CFG protocol (SDE, 250 steps;
  # sample.py --protocol), against ADM's reference batch; then 50K samples at the last checkpoint, with CFG
  torchrun --nproc_per_node=8 evaluate.py runs/vanilla runs/repa --ref VIRTUAL_imagenet256_labeled.npz \\
      --num-samples 10000 --protocol repa-nocfg
  torchrun --nproc_per_node=8 evaluate.py runs/vanilla runs/repa --ref VIRTUAL_imagenet256_labeled.npz \\
      --num-samples 50000 --steps last --protocol repa
  ... --watch                  # follow runs still training: score each checkpoint as it is written, end after
                               # each run's last one (config max_steps) or --timeout without a new checkpoint
  python evaluate.py runs/vanilla runs/repa --plot --metric fid   # -> eval_fid.png and eval_fid.md

Records: one JSON line per (checkpoint, protocol, reference, number of samples) in RUN/eval.jsonl with the step,
images seen (step x global batch), every metric, the complete protocol (sample.sampling_protocol), the reference
(path, SHA-1 of its content, feature networks), the code version and the wall time. A rerun skips what is scored;
another protocol, reference or sample count adds records beside the old ones. Every checkpoint is sampled with
the same seeds (sample.py's noise is keyed by (seed, sample index)), so curves compare like with like.
Resumable: an interrupted checkpoint continues from its PNGs on disk; SIGTERM / SIGUSR1 / Ctrl-C finish the
batch at hand and exit 0 (rerun the same command). Disk: a checkpoint's samples live in
RUN/samples/eval-<protocol hash>/ while it is scored and are deleted once its record is written, so nothing but
the record is kept; --keep-samples keeps the PNGs and the ADM-format .npz beside them.
Sampling runs on every process of the job; the features run on rank 0 (at SiT-XL/2's scale a small part of the time:
docs/evaluation.md).
"""
import argparse
import contextlib
import copy
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch.distributed as dist

import fid
import sample
import sit

METRICS = ['fid', 'sfid', 'inception_score', 'precision', 'recall', 'fd_dinov2', 'fd_toy']  # fid.evaluate's names
NAMES = dict(fid='FID', sfid='sFID', inception_score='Inception Score', precision='Precision', recall='Recall',
             fd_dinov2='FD-DINOv2', fd_toy='toy FD')
LOWER_IS_BETTER, HIGHER_IS_BETTER = ['fid', 'sfid', 'fd_dinov2', 'fd_toy'], ['inception_score', 'precision', 'recall']
NOT_HERE = {'--ckpt': 'name run folders (their checkpoints/*.pt) before the flags',
            '--grid': 'preview grids are sample.py --grid', '--classes': 'preview grids are sample.py --grid'}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's two-line usage error, as one line
        sit.fail(f"{message} (evaluate.py takes its own flags and sample.py's sampler flags, after the run folders; "
                 f"see --help)")


def make_parser(sampler=True):
    """evaluate.py's flags and, with sampler=True, sample.py's sampler flags (sample.add_sampler_flags: the same
    flags, defaults and protocols; --plot takes none)."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
               usage='%(prog)s RUN [RUN ...] (--ref REF | --plot) [options] [sampler flags]')
    p.add_argument('--ref', help='reference images or statistics, any fid.py REF (VIRTUAL_imagenet256_labeled.npz)')
    p.add_argument('--num-samples', type=int, default=10_000, help='per checkpoint (10K: curves; 50K: final numbers)')
    p.add_argument('--steps', default='all', help="which checkpoints: all, last (the newest) or steps 'N,N,...'")
    p.add_argument('--features', default='inception',
                   help=f"fid.py feature types, comma-separated, of {', '.join(fid.STATS_KEYS)} (inception: FID, "
                        f"sFID, IS, precision, recall; dinov2: FD-DINOv2)")
    p.add_argument('--inception-weights', metavar='PATH', help="fid.py's: local pt_inception-2015-12-05 weights")
    p.add_argument('--dinov2-model', default=fid.DINOV2_MODEL, help="fid.py's: timm DINOv2 model name")
    p.add_argument('--dinov2-weights', metavar='PATH', help="fid.py's: local DINOv2 weights ('random': tests)")
    p.add_argument('--feature-batch-size', type=int, default=64, help="fid.py's --batch-size")
    p.add_argument('--keep-samples', action='store_true', help='keep the PNGs and the .npz of each checkpoint')
    p.add_argument('--watch', action='store_true', help='wait for new checkpoints until each run has its last')
    p.add_argument('--timeout', type=float, default=12 * 3600, help='--watch: give up after this many seconds '
                                                                    'without a new checkpoint')
    p.add_argument('--poll', type=float, default=60, help='--watch: seconds between looks for new checkpoints')
    p.add_argument('--plot', action='store_true', help="draw the records instead of scoring (needs matplotlib)")
    p.add_argument('--metric', default='fid', help=f"--plot: one of {', '.join(METRICS)}")
    p.add_argument('--out', help='--plot: figure path (default eval_METRIC.png); the table goes beside it as .md')
    p.add_argument('--log', action='store_true', help='--plot: log y axis (late differences of a falling FD show)')
    p.add_argument('--baseline', metavar='RUN', help="--plot: also a table of the steps (and images) each other run "
                   "needs to reach RUN's metric at each of RUN's checkpoints, and the ratio: the papers' 'N x fewer "
                   "steps'")
    if sampler:
        sample.add_sampler_flags(p.add_argument_group(
            "sampler flags (sample.py's, same defaults; --sample-dir D puts the samples in D/RUN-eval-HASH)"), own=False)
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((i for i, a in enumerate(argv) if a.startswith('-')), len(argv))
    runs, flags = argv[:first], argv[first:]
    if '--plot' in flags:  # draws what is recorded: evaluate.py's own flags only
        args, rest = make_parser(sampler=False).parse_known_args(flags)
        if rest:
            sit.fail(f"--plot draws existing records and takes no sampler flags (got {' '.join(rest)})")
    else:
        for flag, why in NOT_HERE.items():  # before argparse, which would only say "unrecognized arguments"
            if any(a == flag or a.startswith(flag + '=') for a in flags):
                sit.fail(f'evaluate.py does not take {flag}: {why}')
        args = make_parser().parse_args(flags)
    args.runs = [r.rstrip('/') or '/' for r in runs]
    if not args.runs:
        sit.fail('name at least one run folder first: evaluate.py RUN [RUN ...] --ref REF [flags]')
    for r in args.runs:
        if not os.path.isdir(r):
            sit.fail(f"run folder '{r}' does not exist")
    if args.plot:
        if args.baseline is not None and args.baseline.rstrip('/') not in args.runs:
            sit.fail(f"--baseline {args.baseline}: name it among the run folders too (evaluate.py RUN ... --plot "
                     f"--baseline RUN)")
        if args.baseline is not None and args.metric not in LOWER_IS_BETTER + HIGHER_IS_BETTER:
            sit.fail(f"--baseline needs a metric with a direction: one of {', '.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)}")
        return args
    # -------------------------------------------------------------------------
    # everything that can fail, before any model is built or sample written
    if args.num_samples < 2:
        sit.fail('--num-samples must be at least 2 (a covariance needs two samples; 10000 or 50000 as the papers)')
    # the sample count is evaluate.py's own flag, part of a record's key: neither a protocol setting nor an override
    num_samples = args.num_samples
    del args.num_samples
    sample.resolve_sampler_flags(args)
    args.num_samples = num_samples
    args.features = [k.strip() for k in args.features.split(',') if k.strip()]
    bad = [k for k in args.features if k not in fid.STATS_KEYS]
    if bad or not args.features:
        sit.fail(f"--features {','.join(bad) or 'is empty'}: choose from {', '.join(fid.STATS_KEYS)}")
    if args.steps not in ('all', 'last') and not re.fullmatch(r'\d+(,\d+)*', args.steps):
        sit.fail(f"--steps {args.steps}: use all, last or comma-separated steps like 100000,200000")
    for flag, path in (('--inception-weights', args.inception_weights), ('--dinov2-weights', args.dinov2_weights)):
        if path not in (None, 'random') and not os.path.isfile(path):
            sit.fail(f'{flag} {path}: no such file')
    if not args.ref:
        sit.fail('pass --ref REF: the reference images or statistics (e.g. VIRTUAL_imagenet256_labeled.npz), '
                 'or --plot to draw existing records')
    if not os.path.exists(args.ref):
        sit.fail(f"reference '{args.ref}' does not exist; pass --ref to an .npz (arr_0 images or mu/sigma) or a "
                 f"folder of PNGs")
    for kind in args.features:
        try:
            fid.check_input(args.ref, kind)
        except SystemExit as e:  # fid.py stands alone (no sit.fail): its own one line, in this script's form
            sit.fail(str(e.code).removeprefix('fid.py: '))
    for r in args.runs:
        if not checkpoints(r) and not (args.watch and os.path.isfile(os.path.join(r, 'config.json'))):
            sit.fail(f"no checkpoints in '{r}/checkpoints'" + ('' if args.watch else
                     ' (a run still before its first checkpoint: add --watch)'))
    return args


# -----------------------------------------------------------------------------
# Runs, checkpoints and identities


def checkpoints(run):
    """[(step, path)] of RUN/checkpoints/NNNNNNN.pt, ascending. Training writes them as .pt.tmp and renames, so
    a listed file is complete."""
    d = os.path.join(run, 'checkpoints')
    names = sorted(f for f in os.listdir(d) if re.fullmatch(r'\d+\.pt', f)) if os.path.isdir(d) else []
    return [(int(f[:-3]), os.path.join(d, f)) for f in names]


def run_config(run, ckpt_path):
    """The run's config (method, model, global_batch, max_steps): RUN/config.json, else the checkpoint's own."""
    path = os.path.join(run, 'config.json')
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    ckpt = sit.load_checkpoint(ckpt_path)
    return ckpt.get('config', {}) if isinstance(ckpt, dict) else {}


def code_version():
    """git commit of this checkout (+dirty when the scripts that make the numbers differ from it), else a SHA-1
    of those scripts."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = ['sit.py', 'sample.py', 'fid.py', 'evaluate.py']
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = lambda *a: subprocess.run(['git', '-C', here, *a], capture_output=True, text=True, check=True).stdout
        return 'git:' + git('rev-parse', 'HEAD').strip() + ('+dirty' if git('status', '--porcelain', *files) else '')
    h = hashlib.sha1()
    for f in files:
        with open(os.path.join(here, f), 'rb') as fh:
            h.update(fh.read())
    return 'sha1:' + h.hexdigest()


def content_sha1(path):
    """SHA-1 of what the reference's statistics are computed from: the file's bytes (a 2 GB .npz takes seconds),
    or, for a folder of PNGs, their names, sizes and mtimes (fid.py's cache key)."""
    if os.path.isdir(path):
        return hashlib.sha1(repr([(f, s) for f, s, _ in fid._fingerprint(path)]).encode()).hexdigest()
    return sit.file_sha1(path)


def feature_id(kind, args):
    """What the metrics depend on beyond the images: each feature network's weights (file name and size)."""
    w = {'inception': args.inception_weights, 'dinov2': args.dinov2_weights}.get(kind)
    name = {'inception': os.path.basename(fid.INCEPTION_URL), 'dinov2': args.dinov2_model}.get(kind, kind)
    if w and os.path.isfile(w):
        return f'{name} from {os.path.basename(w)} ({os.path.getsize(w)} bytes)'
    return f'{name} ({w})' if w else name


def record_key(rec):
    """(checkpoint, protocol, reference, number of samples) as one string: the identity of a record."""
    ref = rec['reference']
    return json.dumps([os.path.basename(rec['checkpoint']), rec['protocol'], ref['sha1'], ref['features'],
                       rec['num_samples']], sort_keys=True)


_warned = set()  # torn lines already reported by this process (records are read again and again)


def read_records(run):
    """RUN/eval.jsonl's records. A line that is not a whole record (a partial append on a full disk, a write lost on a
    network file system) is skipped with one warning line: the records before and after it still count, and its
    checkpoint, having no record, is scored again."""
    path = os.path.join(run, 'eval.jsonl')
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, errors='replace') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if (path, n) not in _warned:
                    _warned.add((path, n))
                    print(f"warning: {path} line {n} is not a complete record (a torn write?); skipped, its checkpoint "
                          f"counts as not scored", file=sys.stderr, flush=True)
    return records


def append_record(run, rec):
    """Append one line, unless a record with its key is there. One write() of the whole line, then fsync, under
    an exclusive lock that also covers the check: two evaluators of the same run never write a key twice. After a
    torn last line (no newline) the record starts on a fresh line, so it is never glued to the torn one."""
    path = os.path.join(run, 'eval.jsonl')
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        key = record_key(rec)
        if any(record_key(r) == key for r in read_records(run)):
            return False
        size = os.fstat(fd).st_size
        fresh = '\n' if size and os.pread(fd, 1, size - 1) != b'\n' else ''
        os.write(fd, (fresh + json.dumps(rec) + '\n').encode())
        os.fsync(fd)
        return True
    finally:
        os.close(fd)  # releases the lock


# -----------------------------------------------------------------------------
# Scoring


def score(folder, args, device):
    """fid.evaluate on the checkpoint's PNG folder, once per feature type -> (metrics dict, notes)."""
    metrics, notes = {}, []
    for kind in args.features:
        res = fid.evaluate(folder, args.ref, features=kind, inception_weights=args.inception_weights,
                           dinov2_model=args.dinov2_model, dinov2_weights=args.dinov2_weights,
                           batch_size=args.feature_batch_size, device=str(device))
        notes += res.pop('notes')
        metrics.update({k: v for k, v in res.items() if k not in ('num_samples', 'num_ref')})
    return metrics, notes


def evaluate_runs(args):
    rank, world, device = sit.setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    protocol = sample.sampling_protocol(args)
    phash = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:10]
    ref, code = None, None
    if rank == 0:
        t = time.time()
        ref = dict(path=os.path.abspath(args.ref), sha1=content_sha1(args.ref),
                   features={k: feature_id(k, args) for k in args.features})
        code = code_version()
        log(f"reference {args.ref}: sha1 {ref['sha1'][:12]} ({time.time() - t:.1f}s); protocol {phash}: "
            f"{json.dumps(protocol)}")
    stop = sit.StopFlag()  # one for the whole job: sample_for_evaluation uses it too

    def sample_dir(run):
        return (os.path.join(args.sample_dir, f'{os.path.basename(os.path.abspath(run))}-eval-{phash}')
                if args.sample_dir else os.path.join(run, 'samples', f'eval-{phash}'))

    def todo():
        """Rank 0: [(run, step, path)] still to score, and whether every run has its last checkpoint scored."""
        work, finished = [], True
        for run in args.runs:
            ckpts = checkpoints(run)
            if not ckpts:
                finished = False
                continue
            steps = None if args.steps in ('all', 'last') else {int(s) for s in args.steps.split(',')}
            wanted = ckpts[-1:] if args.steps == 'last' else [c for c in ckpts if steps is None or c[0] in steps]
            scored = {record_key(r) for r in read_records(run)}
            work += [(run, step, path) for step, path in wanted if record_key(dict(
                checkpoint=path, protocol=protocol, reference=ref, num_samples=args.num_samples)) not in scored]
            max_steps = run_config(run, ckpts[-1][1]).get('max_steps')  # may grow when a run is resumed
            finished = finished and (ckpts[-1][0] >= max_steps if steps is None and max_steps is not None else
                                     steps is not None and steps <= {c[0] for c in ckpts})
        return work, finished

    done, t_start, last_new = 0, time.time(), time.time()
    while True:
        state = [None]
        if rank == 0:
            work, finished = todo()
            last_new = time.time() if work else last_new
            state = [(work, finished, time.time() - last_new > args.timeout)]
        if world > 1:
            dist.broadcast_object_list(state, src=0)
        work, finished, timed_out = state[0]
        if work:
            log(f"{len(work)} checkpoint(s) to score: " + ', '.join(f'{r}@{s}' for r, s, _ in work))
        elif not args.watch:
            log(f'nothing to score: every chosen checkpoint has a record with this protocol, reference and '
                f'{args.num_samples} samples')
        for n, (run, step, path) in enumerate(work):
            if stop():  # all ranks ask at the same point, so a signal seen by any rank stops them together
                break
            a = copy.copy(args)
            a.ckpt, a.sample_dir = path, sample_dir(run)
            t0 = time.time()
            folder, complete = sample.sample_for_evaluation(a, rank, world, device, stop=stop,
                                                            write_npz=args.keep_samples)
            if not complete:
                break
            t1 = time.time()
            if rank == 0:
                metrics, notes = score(folder, args, device)
                t2 = time.time()
                cfg = run_config(run, path)
                rec = dict(run=os.path.abspath(run), checkpoint=os.path.relpath(path, run), step=step,
                           images_seen=step * cfg['global_batch'] if 'global_batch' in cfg else None,
                           method=cfg.get('method'), model=cfg.get('model'), num_samples=args.num_samples,
                           metrics=metrics, notes=notes, protocol=protocol, reference=ref, code=code,
                           wall_time=dict(sampling=round(t1 - t0, 2), features=round(t2 - t1, 2),
                                          total=round(t2 - t0, 2)),
                           world_size=world, device=device.type,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
                wrote = append_record(run, rec)
                if not args.keep_samples:  # after the record: a kill in between leaves samples, not a lost score
                    shutil.rmtree(folder, ignore_errors=True)
                    with contextlib.suppress(OSError):  # RUN/samples/eval-HASH and RUN/samples, when empty
                        os.rmdir(os.path.dirname(folder))
                        os.rmdir(os.path.dirname(os.path.dirname(folder)))
                done += 1
                shown = ', '.join(f'{k} {metrics[k]:.4g}' for k in METRICS if metrics.get(k) is not None)
                eta = (time.time() - t_start) / done * (len(work) - n - 1)
                log(f"{run} step {step}: {shown} | sampling {t1 - t0:.1f}s, features {t2 - t1:.1f}s | "
                    f"{'recorded' if wrote else 'already recorded by another process'} in {run}/eval.jsonl | "
                    f"{n + 1}/{len(work)}, eta {sit.format_time(eta)}"
                    + ('' if args.keep_samples else ' | samples deleted (--keep-samples keeps them)'))
        else:
            if not args.watch or finished:
                if args.watch:
                    log('every run has its last checkpoint scored')
                break
            if timed_out:
                log(f'--watch: no new checkpoint for {args.timeout:.0f}s; ending (rerun to continue)')
                break
            t = time.time()
            while time.time() - t < args.poll and not stop.requested:  # sleep, but wake for a stop signal
                time.sleep(min(1.0, args.poll))
            if not stop():
                continue
        log('stopped by signal: scored checkpoints are recorded, an interrupted one keeps its PNGs; rerun the same '
            'command to continue')
        break
    if world > 1:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# The figure and the table


def describe(protocol):
    """A protocol as a short title: sampler, steps, guidance, seed, weights, and what is not the default."""
    p = protocol
    s = f"{'heun' if p['heun'] else p['mode']} {p['num_steps']} steps"
    if p['cfg_scale'] != 1:
        s += f", CFG {p['cfg_scale']}" + ('' if (p['guidance_low'], p['guidance_high']) == (0, 1) else
                                          f" on {p['guidance_low']} <= t <= {p['guidance_high']}")
    s += f", seed {p['seed']}, {p['weights']}"
    s += ''.join(f', {k}' for k in ('class_balanced', 'round', 'bf16', 'sit_convention') if p.get(k))
    return (f"protocol {p['protocol']}: " if p.get('protocol') else '') + s


def groups(records):
    """Records by (protocol, reference, sample count, features): each group is one panel, never mixed."""
    out = {}
    for r in records:
        k = json.dumps([r['protocol'], r['reference']['sha1'], r['reference']['features'], r['num_samples']],
                       sort_keys=True)
        out.setdefault(k, []).append(r)
    return list(out.values())


def label(run, recs):
    r = recs[0]
    return f"{r.get('method') or '?'} {r.get('model') or '?'} ({run})"


def table(group, metric, runs):
    """Markdown: rows are steps, columns are runs."""
    by_run = {run: {r['step']: r['metrics'].get(metric) for r in recs} for run, recs in runs.items()}
    steps = sorted({s for v in by_run.values() for s in v})
    r0 = group[0]
    ref = f"{os.path.basename(r0['reference']['path'])} ({r0['reference']['sha1'][:8]})"
    lines = [f"{NAMES.get(metric, metric)} | {describe(r0['protocol'])} | ref {ref} | {r0['num_samples']} samples", '',
             '| step | ' + ' | '.join(label(run, recs) for run, recs in runs.items()) + ' |',
             '|---:|' + '---:|' * len(runs)]
    for s in steps:
        cells = [by_run[run].get(s) for run in runs]
        lines.append(f'| {s:,} | ' + ' | '.join('' if v is None else f'{v:.4g}' for v in cells) + ' |')
    return '\n'.join(lines)


def steps_to(curve, target, lower=True):
    """The first step at which a curve {step: metric} reaches target (<= target; >= with lower=False),
    interpolated between the two checkpoints that bracket it, linearly in the log of the metric (FD-like curves
    fall roughly exponentially between checkpoints), so a run that gets there 20 steps sooner shows it with
    checkpoints 50 apart. The first checkpoint itself if it is already there; None if no checkpoint is."""
    prev, sign = None, 1 if lower else -1
    for step, value in sorted(curve.items()):
        if sign * value <= sign * target:
            if prev is None:
                return float(step)
            s0, v0 = prev
            return s0 + (step - s0) * (np.log(v0) - np.log(target)) / (np.log(v0) - np.log(value))
        prev = (step, value)
    return None


def baseline_table(group, metric, runs, baseline):
    """Markdown: for each checkpoint of the baseline run, its metric and, for every other run, the steps (images) it
    needs to reach that value (steps_to) and the ratio baseline steps / its steps."""
    curves = {run: {r['step']: r['metrics'][metric] for r in recs} for run, recs in runs.items()}
    per_step = {run: recs[0]['images_seen'] / recs[0]['step'] if recs[0].get('images_seen') and recs[0]['step'] else
                None for run, recs in runs.items()}
    others = [run for run in runs if run != baseline]
    lines = [f"steps to reach {label(baseline, runs[baseline])}'s {NAMES.get(metric, metric)} (images seen; its "
             f"steps / the run's), interpolated between checkpoints in log {NAMES.get(metric, metric)}", '',
             f'| {baseline} step | {NAMES.get(metric, metric)} | ' + ' | '.join(label(r, runs[r]) for r in others) + ' |',
             '|---:|---:|' + '---:|' * len(others)]
    for step, value in sorted(curves[baseline].items()):
        cells = []
        for run in others:
            s = steps_to(curves[run], value, lower=metric in LOWER_IS_BETTER)
            images = f', {s * per_step[run]:,.0f} img' if s is not None and per_step[run] else ''
            cells.append('not reached' if s is None else f'{s:,.0f}{images} ({step / s:.2f}x)' if s > 0 else
                         f'{s:,.0f}{images}')
        lines.append(f'| {step:,} | {value:.4g} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(args):
    try:
        import matplotlib
    except ImportError:
        sit.fail('the figure needs matplotlib: pip install matplotlib')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter
    records = [dict(r, run_label=run) for run in args.runs for r in read_records(run)]
    records = [r for r in records if r['metrics'].get(args.metric) is not None]
    if not records:
        sit.fail(f"no records with metric '{args.metric}' in {', '.join(args.runs)} (metrics: "
                 f"{', '.join(METRICS)}); score the runs first: evaluate.py RUN ... --ref REF")
    panels = groups(records)
    out = args.out or f'eval_{args.metric}.png'
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 4.6 * len(panels)), squeeze=False)
    tables = []
    for (ax_step, ax_img), group in zip(axes, panels):
        runs = {}
        for r in group:
            runs.setdefault(r['run_label'], []).append(r)
        for run, recs in runs.items():
            recs.sort(key=lambda r: r['step'])
            y = [r['metrics'][args.metric] for r in recs]
            ax_step.plot([r['step'] for r in recs], y, 'o-', label=label(run, recs))
            if all(r.get('images_seen') is not None for r in recs):
                ax_img.plot([r['images_seen'] for r in recs], y, 'o-', label=label(run, recs))
        r0 = group[0]
        title = (f"{describe(r0['protocol'])}\nref {os.path.basename(r0['reference']['path'])} "
                 f"({r0['reference']['sha1'][:8]}), {r0['num_samples']:,} samples, "
                 f"{', '.join(r0['reference']['features'])}")
        for ax, x in ((ax_step, 'training step'), (ax_img, 'images seen')):
            ax.set_xlabel(x)
            ax.set_ylabel(NAMES.get(args.metric, args.metric))
            ax.set_yscale('log' if args.log else 'linear')
            ax.xaxis.set_major_formatter(EngFormatter())
            ax.grid(alpha=0.3)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)
        tables.append(table(group, args.metric, runs))
        if args.baseline is not None:
            base = args.baseline.rstrip('/')
            if base in runs and len(runs) > 1:
                tables.append(baseline_table(group, args.metric, runs, base))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    md = os.path.splitext(out)[0] + '.md'
    with open(md, 'w') as f:
        f.write('\n\n'.join(tables) + '\n')
    print('\n\n'.join(tables))
    print(f'figure -> {out} ({len(panels)} panel row(s): one per protocol/reference/sample count); table -> {md}')
    return panels


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot(args)
    evaluate_runs(args)


if __name__ == '__main__':
    main()
