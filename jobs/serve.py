"""Serve model versions over HTTP on Ray Serve: images on demand, swap grids, async jobs and a web page.

    python jobs/serve.py --config configs/demo.yaml
    python jobs/serve.py --config configs/demo.yaml serve.port=8080 "serve.models=[vgmedgen-demo@current]"
    VGMEDGEN_SERVE_TOKEN=$(openssl rand -hex 32) python jobs/serve.py --config configs/demo.yaml serve.host=0.0.0.0
    python jobs/serve.py --config configs/demo.yaml --address 10.0.0.5:6379      # on a running cluster

Prints the web page, API docs and health URLs, then serves until Ctrl-C, which deletes the application
(and its async jobs) and stops Serve. The `serve` section of the config (docs/serve.md) sets the models,
host and port, batching, queue limits, deadlines, replicas and the token; infra/serve.yaml runs the same
application with `serve run` / `serve deploy`.
"""

from __future__ import annotations

import time

from vgmedgen.platform.cli import exit_job, job_parser, load_from_args, run_job
from vgmedgen.platform.cluster import connect


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__).parse_args(argv)
    cfg = load_from_args(args)
    from ray import serve

    from vgmedgen.serve.app import build_app, shutdown, start, token_warning

    app = build_app(cfg)  # a bad model reference or token file fails here, before connecting
    connect(args.address)
    urls = start(cfg, app)
    try:
        print(f"\nweb page:  {urls['page']}\nAPI docs:  {urls['docs']}\nhealth:    {urls['health']}")
        if warning := token_warning(cfg):
            print(f"\nWARNING: {warning}")
        print("\nserving; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    finally:
        shutdown(cfg)
        serve.shutdown()


if __name__ == "__main__":
    exit_job(run_job(main))
