"""The Flex Template launcher's program (FLEX_TEMPLATE_PYTHON_PY_FILE): the template's
parameters become ``rso generate`` flags (:mod:`deploy.dataflow.flex_template.parameters`);
the job is built (every check, the models' content ids, the partitions to reuse) and submitted,
not waited for: the launcher VM exits once Dataflow has the job. The job writes OUTPUT directly,
``_SUCCESS`` last."""
from __future__ import annotations

import sys

from beam_pipelines.pipeline import main as generate
from deploy.dataflow.flex_template.parameters import to_flags

if __name__ == "__main__":
    sys.exit(generate(to_flags(sys.argv[1:]), wait=False))
