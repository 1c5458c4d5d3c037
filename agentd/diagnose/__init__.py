"""`agentd diagnose` and `agentd record`: a source in, a report out.

    sources/   where the signals come from (live, daemon, recording, Prometheus x2)
    render.py  the text report
    plot.py    --plot
    record.py  `agentd record`

Exit status (agentd/exitcodes.py): 0 no finding at or above --fail-on; 1 findings at or
above --fail-on; 2 usage error; 3 the source cannot be reached or read; 4 the output cannot
be written; 70 a bug.
"""

from __future__ import annotations

import json

from agentd.analysis.core import Options, Report, analyze
from agentd.analysis.findings import SEVERITIES
from agentd.analysis.signals import Signals
from agentd.diagnose.sources import SourceError
from agentd.exitcodes import FINDINGS as EXIT_FINDINGS, OK as EXIT_OK, OUTPUT as EXIT_OUTPUT, \
    SOURCE as EXIT_SOURCE, USAGE as EXIT_USAGE, OutputError, write_stdout

__all__ = ["EXIT_FINDINGS", "EXIT_OK", "EXIT_OUTPUT", "EXIT_SOURCE", "EXIT_USAGE",
           "OutputError", "SourceError", "exit_status", "report_and_exit"]


MIN_SAMPLES = 10  # fewer samples than this are no diagnosis


def exit_status(r: Report, fail_on: str) -> int:
    worst = r.worst_severity()
    if worst is None or SEVERITIES.index(worst) < SEVERITIES.index(fail_on):
        return EXIT_OK
    return EXIT_FINDINGS


def report_and_exit(sig: Signals, args) -> int:
    from agentd.diagnose.render import render_text

    if len(sig.t) < MIN_SAMPLES:
        fix = (f" (one every {sig.resolution:g} s: a longer --last or a shorter --step)"
               if sig.source.startswith("prometheus") else "")
        raise SourceError(f"{sig.source} holds {len(sig.t)} samples: too few to analyse, "
                          f"at least {MIN_SAMPLES} are needed{fix}")
    if not sig.gpus() and not sig.subjects("gpu.busy_time") and not any(
            (i or {}).get("lost") for i in (sig.meta.get("gpus") or {}).values()):
        samplers = sig.meta.get("samplers") or {}
        ran = sorted(n for n, s in samplers.items() if s.get("available"))
        why = (samplers.get("gpu") or {}).get("reason") or "the source holds no GPU series"
        raise SourceError(f"no GPU found in {sig.source} ({why})" +
                          (f"; samplers that ran: {', '.join(ran)}" if ran else ""))
    opts = Options(samples_per_step=args.samples_per_step, tokens_per_step=args.tokens_per_step,
                   price_per_gpu_hour=args.price_per_gpu_hour)
    r = analyze(sig, opts, node=args.node or sig.node)
    if args.plot:
        from agentd.diagnose.plot import plot

        plot(sig, r, args.plot)  # before any output: a missing matplotlib is a usage error
    text = json.dumps(r.to_json(), indent=1, allow_nan=False) + "\n" if args.json else \
        render_text(r)
    write_stdout(text, "the report")
    return exit_status(r, args.fail_on)
