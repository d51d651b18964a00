"""SGLang's native routes, for the trainers that drive an SGLang server (slime, AReaL, ROLL, verl's HTTP
adapter): `/generate`, `/abort_request`, `/pause_generation`, `/continue_generation`, `/flush_cache`,
`/update_weights_from_disk`, `/get_weight_version`, `/v1/loads` and `/get_load`, `/health_generate`.

Bodies and answers follow SGLang's: `/generate` answers `{"text", "output_ids", "meta_info"}` (a list for a
batch; with n > 1, the batch repeated n times, sample-major), `meta_info.output_token_logprobs` is
`[[logprob, token_id, text or null], ...]` and `finish_reason` is `{"type": "stop", "matched": ...}`,
`{"type": "length", "length": N}` or `{"type": "abort", "message": ...}`; weight versions are strings.
A paused server holds new `/generate` calls until it continues, as SGLang does.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from decoding import RequestOutput
from decoding.outputs import CompletionOutput
from decoding.sequence import TokenLogprob
from decoding.weights import WeightUpdateError, read_checkpoint
from server import resumable
from server.errors import AUTH_ERRORS, GENERATION_ERRORS, APIError
from server.responses import kept_support, wire_logprob
from server.rl_control import load_figures
from server.sglang_protocol import (AbortRequest, ContinueGenerationRequest, GenerateRequest, PauseGenerationRequest,
                                    UpdateWeightsFromDiskRequest)

LOAD_FORMATS = (None, "auto", "safetensors")


class GenerateView:
    """SGLang's output items from engine snapshots; each streamed item is cumulative, as SGLang's are."""

    def __init__(self, tokenizer, body: GenerateRequest, num_prompts: int):
        self.tokenizer = tokenizer
        self.body = body
        self.num_prompts = num_prompts

    def position(self, prompt_index: int, completion: CompletionOutput) -> int:
        """SGLang expands n samples as the batch repeated n times: sample-major order."""
        return completion.index * self.num_prompts + prompt_index

    def item(self, output: RequestOutput, completion: CompletionOutput) -> dict:
        if self.body.scores_only:                 # the one token computed for it is not part of the answer
            completion = replace(completion, text="", token_ids=[], logprobs=[],
                                 finish_reason=completion.finish_reason and "length")
        meta = {"id": output.request_id, "finish_reason": self._finish_reason(completion),
                "prompt_tokens": len(output.prompt_token_ids), "completion_tokens": len(completion.token_ids),
                "cached_tokens": output.num_cached_tokens,
                # The version of its last token (SGLang reports the one it finished under); none if it never ran.
                "weight_version": str(completion.version_ranges[-1][1]) if completion.version_ranges else None,
                "weight_version_ranges": [[start, str(v)] for start, v in completion.version_ranges]}
        if output.finish_time is not None and output.arrival_time is not None:
            meta["e2e_latency"] = output.finish_time - output.arrival_time
        if self.body.return_logprob:
            meta["output_token_logprobs"] = self._triples(completion.token_ids, completion.logprobs or [])
            if self.body.top_logprobs_num:
                meta["output_top_logprobs"] = [self._top(lp) for lp in completion.logprobs or []]
            kept = kept_support(completion.logprobs or [])
            if kept:
                meta["output_token_kept_logprobs"] = kept["kept_logprobs"]
                if self.body.return_kept_token_ids:
                    meta["output_token_kept_ids"] = kept["kept_token_ids"]
            if self.body.logprob_start_len >= 0 and output.prompt_logprobs is not None:
                start = self.body.logprob_start_len
                meta["input_token_logprobs"] = self._triples(output.prompt_token_ids[start:],
                                                             output.prompt_logprobs[start:])
        return {"text": completion.text, "output_ids": completion.token_ids, "meta_info": meta}

    def _finish_reason(self, completion: CompletionOutput) -> dict | None:
        reason = completion.finish_reason
        if reason is None:
            return None
        if reason == "length":
            return {"type": "length", "length": len(completion.token_ids)}
        if reason == "abort":
            return {"type": "abort", "message": "aborted" if completion.token_ids else "Abort in waiting queue"}
        matched = completion.stop_reason
        if matched is None and completion.token_ids:      # an EOS token: SGLang names it
            matched = completion.token_ids[-1]
        return {"type": "stop", "matched": matched}

    def _text(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.body.return_text_in_logprobs else None

    def _triples(self, token_ids: list[int], logprobs: list[TokenLogprob | None]) -> list[list]:
        return [[None if lp is None else wire_logprob(lp.logprob), token_id, self._text(token_id)]
                for token_id, lp in zip(token_ids, logprobs)]

    def _top(self, lp: TokenLogprob | None) -> list[list] | None:
        if lp is None or not lp.top:
            return None
        return [[wire_logprob(value), token_id, self._text(token_id)] for token_id, value in lp.top.items()]


def add_sglang_routes(app: FastAPI, server, collect) -> None:
    _add_generate(app, server, collect)
    _add_control(app, server.front)
    _add_weights(app, server)
    _add_load(app, server)


def _add_generate(app: FastAPI, server, collect) -> None:
    engine = server.engine

    @app.api_route("/generate", methods=["POST", "PUT"], responses=GENERATION_ERRORS)
    async def generate(body: GenerateRequest, request: Request):
        try:
            prompts, batched = body.prompts()
            params = body.params(engine.loaded.model.vocab_size)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        streams = await server.submit(prompts, params, stream=body.stream, request_id=body.rid,
                                      resumptions=resumable.started_under(request, len(prompts)))
        view = GenerateView(engine.tokenizer, body, len(prompts))
        if body.stream:
            return StreamingResponse(_stream(server, streams, view), media_type="text/event-stream")
        items: list[dict | None] = [None] * (len(prompts) * params.n)
        for prompt_index, output in enumerate(await collect(server, streams, request)):
            for completion in output.outputs:
                items[view.position(prompt_index, completion)] = view.item(output, completion)
        return items if batched or params.n > 1 else items[0]


def _add_control(app: FastAPI, front) -> None:
    @app.post("/abort_request", responses=AUTH_ERRORS)
    async def abort_request(body: AbortRequest):
        if body.abort_all:
            await front.abort_requests(None)
        elif body.rid:
            await front.abort_requests([body.rid])
        return {}

    @app.post("/pause_generation", responses=AUTH_ERRORS)
    async def pause_generation(body: PauseGenerationRequest | None = None):
        mode = (body or PauseGenerationRequest()).mode
        await front.pause("abort" if mode == "abort" else "keep", recompute_on_resume=mode == "retract")
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation", responses=AUTH_ERRORS)
    async def continue_generation(body: ContinueGenerationRequest | None = None):
        await front.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.api_route("/flush_cache", methods=["GET", "POST"], responses=AUTH_ERRORS)
    async def flush_cache():
        """Requests in flight keep the blocks they hold, so flushing never has to wait for them."""
        await front.reset_prefix_cache()
        return PlainTextResponse("Cache flushed.\n")


def _add_weights(app: FastAPI, server) -> None:
    engine, front = server.engine, server.front

    @app.post("/update_weights_from_disk", responses=AUTH_ERRORS)
    async def update_weights_from_disk(body: UpdateWeightsFromDiskRequest):
        try:
            version = body.version()
            if body.load_format not in LOAD_FORMATS:
                raise WeightUpdateError(f"load_format {body.load_format!r} is not supported; "
                                        "the server reads safetensors checkpoints")
            tensors = await asyncio.to_thread(read_checkpoint, body.model_path)
            policy = "abort" if body.abort_all_requests else "wait"
            new_version = await front.update_weights(tensors, version, policy, require_all=True, dry_run=body.dry_run,
                                                     keep_previous=body.keep_previous)
        except (WeightUpdateError, ValueError, OSError) as err:
            return JSONResponse({"success": False, "message": str(err), "num_paused_requests": 0}, status_code=400)
        if body.flush_cache and not body.dry_run:
            await front.reset_prefix_cache()           # already dropped by the update; kept for the contract
        message = (f"The checkpoint fits the model; nothing changed (dry run). weight_version would be {new_version}"
                   if body.dry_run else f"Succeeded to update model weights. weight_version={new_version}")
        return {"success": True, "message": message, "num_paused_requests": 0}

    @app.get("/get_weight_version", responses=AUTH_ERRORS)
    async def get_weight_version():
        return {"weight_version": str(engine.weights.version)}


def _add_load(app: FastAPI, server) -> None:
    @app.get("/v1/loads", responses=AUTH_ERRORS)
    async def loads():
        figures = await load_figures(server)
        return {"timestamp": time.time(), "loads": [{"dp_rank": 0, **figures}]}

    @app.get("/get_load", responses=AUTH_ERRORS)
    async def get_load():
        figures = await load_figures(server)
        return [{"dp_rank": 0, "num_reqs": figures["num_running_reqs"] + figures["num_waiting_reqs"],
                 "num_waiting_reqs": figures["num_waiting_reqs"], "num_tokens": figures["num_used_tokens"]}]

    @app.get("/health_generate")
    async def health_generate():
        """Healthy while the engine thread runs (SGLang probes with a one-token request)."""
        if not server.front.thread.alive:
            raise APIError(503, "the engine thread has stopped", type_="server_error")
        return {}


async def _stream(server, streams, view: GenerateView):
    """Cumulative items as SSE events, each with its position in the answer, then [DONE]."""
    try:
        async for prompt_index, output in server.follow(streams):
            for completion in output.outputs:
                item = view.item(output, completion)
                item["index"] = view.position(prompt_index, completion)
                yield f"data: {json.dumps(item)}\n\n"
    except APIError as err:
        yield f"data: {json.dumps({'error': {'message': err.message}})}\n\n"
    yield "data: [DONE]\n\n"
