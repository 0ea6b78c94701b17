"""The job's CLI with decoders a test paces: ``python -m tests.helpers.gated_render GATE_FILE DELAY_S <render args>``.

Every decoder call sleeps DELAY_S while GATE_FILE exists (`tests.helpers.slow_stages.GatedDecoder`): a test on a real
cluster keeps work waiting for as long as it needs (nodes join and die meanwhile) without burning the CPUs
the nodes start on, then removes the file and the rest renders at full speed.
"""

from __future__ import annotations

import sys

from jobs import render
from jobs.execution import chain
from tests.helpers.slow_stages import GatedDecoder, with_decoder

if __name__ == "__main__":
    gate, delay_s, *arguments = sys.argv[1:]
    chain.build_chain = with_decoder(chain.build_chain, GatedDecoder, gate_file=gate, delay_s=float(delay_s))
    sys.exit(render.main(arguments, prog="python -m tests.helpers.gated_render"))
