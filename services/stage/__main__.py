"""``python -m services.stage``: one model level as a service.

Settings come from ``PIPESPEC_STAGE_*`` environment variables or ``--field value`` flags, e.g.
``python -m services.stage --level 1 --backend hf --model ./models/smollm2 --device cuda:1``.
"""

from __future__ import annotations

import sys

from common.logs import configure
from common.security import KeyError_
from common.settings import StageSettings


def main() -> int:
    settings = StageSettings(_cli_parse_args=True)
    configure(settings.log_level, service="stage", stage_level=settings.level)
    # after logging: loading is slow and may fail
    from common.backends import load_backend
    from services.stage.service import StageService

    try:
        backend = load_backend(settings)
    except Exception as exc:
        print(f"stage level {settings.level}: cannot load backend: {exc}", file=sys.stderr)
        return 2
    try:
        service = StageService(settings, backend)
    except KeyError_ as exc:
        print(f"stage level {settings.level}: {exc}", file=sys.stderr)
        return 2
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
