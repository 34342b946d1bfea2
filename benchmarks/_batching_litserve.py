"""LitServe's side of benchmarks/batching_http.py (imported in LitServe's own venv).

The LitAPI lives at module level: LitServe starts its inference worker with the
multiprocessing `spawn` method, which pickles the API by reference.
"""

from __future__ import annotations

import litserve as ls
import torch
from _batching_servers import build_model


class API(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        self.model = build_model()

    def decode_request(self, request: dict[str, list[float]]) -> torch.Tensor:
        return torch.tensor(request["x"])

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict[str, list[float]]:
        return {"y": output.tolist()}


def serve(port: int) -> None:
    """LitServe at its best setting here: batches of up to 64, 5 ms to fill one."""
    server = ls.LitServer(
        API(max_batch_size=64, batch_timeout=0.005), accelerator="cpu", workers_per_device=1
    )
    server.run(
        host="127.0.0.1",
        port=port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    import sys

    serve(int(sys.argv[1]))
