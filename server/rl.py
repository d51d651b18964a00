"""Routes for RL trainers: group rollouts, teacher-forced scoring and weight sync."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request

from decoding import RequestOutput, SamplingParams
from decoding.weights import NothingToRollBack, WeightUpdateError, read_checkpoint, read_payload
from server import resumable
from server.errors import AUTH_ERRORS, GENERATION_ERRORS, WEIGHT_ERRORS, WEIGHT_PUSH_ERRORS, APIError
from server.protocol import RolloutRequest, ScoreRequest, SharedWeightsRequest, WeightsLoadRequest
from server.responses import chat_prompt_ids, kept_support, wire_logprob
from wire.shared_weights import SHARED_DIRECTORY, SharedWeightsReader, in_shared_memory


def _as_prompt(tokenizer, prompt):
    """Strings and token ids pass through; a chat message list goes through the chat template."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return prompt
    return chat_prompt_ids(tokenizer, prompt)


def rollout_body(outputs: list[RequestOutput], top_logprobs: int | None) -> dict:
    """TRL's rollout_func shape: one entry per completion, grouped by prompt, prompts in order."""
    body: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "finish_reasons": [],
                             "texts": [], "weight_versions": [], "token_weight_versions": []}
    if top_logprobs:
        body["logprob_token_ids"], body["top_logprobs"] = [], []
    for output in outputs:
        for completion in output.outputs:
            body["prompt_ids"].append(output.prompt_token_ids)
            body["completion_ids"].append(completion.token_ids)
            body["logprobs"].append([wire_logprob(lp.logprob) for lp in completion.logprobs])
            body["finish_reasons"].append(completion.finish_reason)
            body["texts"].append(completion.text)
            body["weight_versions"].append(output.weight_version)
            body["token_weight_versions"].append(completion.token_weight_versions())
            for key, values in kept_support(completion.logprobs).items():
                body.setdefault(key, []).append(values)
            if top_logprobs:
                body["logprob_token_ids"].append([list(lp.top) for lp in completion.logprobs])
                body["top_logprobs"].append([[wire_logprob(v) for v in lp.top.values()] for lp in completion.logprobs])
    versions = set(body["weight_versions"])
    # Each completion is generated wholly under one version; the call's version when they all agree.
    body["weight_version"] = versions.pop() if len(versions) == 1 else None
    return body


def score_body(outputs: list[RequestOutput], prompt_lens: list[int], top_logprobs: int | None,
               reference: bool) -> dict:
    """Each sequence's logprobs after its prompt; with top_logprobs, the k most likely tokens and their
    logprobs at each of those positions (distillation's teacher targets)."""
    positions = [out.prompt_logprobs[start:] for out, start in zip(outputs, prompt_lens)]
    body = {"logprobs": [[wire_logprob(lp.logprob) for lp in row] for row in positions],
            "weight_versions": [None if reference else out.weight_version for out in outputs],
            "model": "reference" if reference else "policy"}
    if top_logprobs:
        body["top_logprob_token_ids"] = [[list(lp.top) for lp in row] for row in positions]
        body["top_logprobs"] = [[[wire_logprob(v) for v in lp.top.values()] for lp in row] for row in positions]
    return body


def add_rl_routes(app: FastAPI, server, collect) -> None:
    engine = server.engine

    @app.post("/v1/rollouts", responses=GENERATION_ERRORS)
    async def rollouts(body: RolloutRequest, request: Request):
        server.check_model(body.model)
        if body.stream:
            raise APIError(400, "rollouts are not streamed; drop 'stream'", param="stream")
        try:
            prompts = await asyncio.to_thread(lambda: [_as_prompt(engine.tokenizer, p) for p in body.prompts])
            params = body.sampling_params(body.max_tokens, body.top_logprobs or 0)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        streams = await server.submit(prompts, params, stream=False, request_id=body.request_id,
                                      resumptions=resumable.started_under(request, len(prompts)))
        outputs = await collect(server, streams, request)
        return rollout_body(outputs, body.top_logprobs)

    add_score_route(app, server, collect)
    add_weight_routes(app, server)
    add_weight_state_routes(app, server)
    add_cache_routes(app, server)


def add_score_route(app: FastAPI, server, collect) -> None:
    @app.post("/v1/score", responses=GENERATION_ERRORS)
    async def score(body: ScoreRequest, request: Request):
        server.check_model(body.model)
        if len(body.prompt_lens) != len(body.sequences):
            raise APIError(400, "prompt_lens must have one entry per sequence", param="prompt_lens")
        for index, (sequence, start) in enumerate(zip(body.sequences, body.prompt_lens)):
            if not 1 <= start < len(sequence):
                raise APIError(400, f"prompt_lens[{index}] must be between 1 and len(sequences[{index}]) - 1",
                               param="prompt_lens")
        front = server.front
        if body.reference:
            if server.reference_front is None:
                raise APIError(400, "this server has no reference model; start it with --reference-model PATH",
                               param="reference")
            front = server.reference_front
        try:
            params = SamplingParams(max_tokens=0, prompt_logprobs=body.top_logprobs or 0,
                                    logprobs_mode=body.logprobs_mode, temperature=body.temperature)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        streams = await server.submit(body.sequences, params, stream=False, request_id=body.request_id, front=front)
        outputs = await collect(server, streams, request)
        return score_body(outputs, body.prompt_lens, body.top_logprobs, body.reference)


def add_cache_routes(app: FastAPI, server) -> None:
    @app.post("/v1/reset_prefix_cache", responses=AUTH_ERRORS)
    @app.post("/reset_prefix_cache", responses=AUTH_ERRORS)          # vLLM's path, which TRL calls
    async def reset_prefix_cache():
        """Drop every cached prefix (vLLM's admin route); requests in flight keep what they hold."""
        await server.front.reset_prefix_cache()
        return {"reset": True}


def add_weight_state_routes(app: FastAPI, server) -> None:
    """The served version; and for two-phase updates across replicas (cluster/weights.py), an update made
    with keep_previous is undone by a rollback, or made final by a commit, once every replica answered."""

    @app.get("/v1/weights/version", responses=AUTH_ERRORS)
    async def weight_version():
        return {"weight_version": server.engine.weights.version}

    @app.post("/v1/weights/rollback", responses=WEIGHT_ERRORS)
    async def rollback_weights(policy: str = "wait"):
        try:
            return {"weight_version": await server.front.rollback_weights(policy)}
        except NothingToRollBack as err:
            raise APIError(409, str(err)) from err
        except WeightUpdateError as err:
            raise APIError(400, str(err), param=err.param) from err

    @app.post("/v1/weights/commit", responses=AUTH_ERRORS)
    async def commit_weights():
        server.engine.weights.forget_previous()
        return {"weight_version": server.engine.weights.version}


def add_weight_routes(app: FastAPI, server) -> None:
    shared_files = SharedWeightsReader()

    @app.post("/v1/weights/load", responses=WEIGHT_ERRORS)
    async def load_weights(body: WeightsLoadRequest):
        try:
            tensors = await asyncio.to_thread(read_checkpoint, body.path)
        except (WeightUpdateError, OSError) as err:
            raise APIError(400, f"could not read weights from {body.path!r}: {err}", param="path") from err
        return await apply(tensors, body.weight_version, body.policy, True, body.allow_non_finite,
                           body.allow_version_rollback, body.recompute_kv, body.dry_run, body.keep_previous)

    @app.post("/v1/weights/update", responses=WEIGHT_PUSH_ERRORS)
    async def update_weights(request: Request, weight_version: int | None = None, policy: str = "wait",
                             allow_non_finite: bool = False, allow_version_rollback: bool = False,
                             recompute_kv: bool = False, dry_run: bool = False, keep_previous: bool = False):
        payload = bytearray()
        async for chunk in request.stream():
            payload += chunk
        try:
            tensors = read_payload(payload)
        except WeightUpdateError as err:
            raise APIError(400, f"the body is not a valid safetensors payload: {err}") from err
        if not tensors:
            raise APIError(400, "the safetensors payload holds no tensors")
        return await apply(tensors, weight_version, policy, False, allow_non_finite, allow_version_rollback,
                           recompute_kv, dry_run, keep_previous)

    @app.post("/v1/weights/update_shared", responses=WEIGHT_PUSH_ERRORS)
    async def update_weights_shared(body: SharedWeightsRequest):
        """The tensors of a shared-memory file a trainer on this machine wrote, read in place (no body)."""
        if not in_shared_memory(body.path):
            raise APIError(400, f"path must be a file under {SHARED_DIRECTORY}/ (shared memory) that the trainer "
                                "wrote; push over /v1/weights/update otherwise", param="path")
        try:
            tensors = shared_files.read(body.path)
        except (OSError, ValueError) as err:
            raise APIError(400, f"could not read shared weights from {body.path!r} ({err}); the trainer must run "
                                "on this machine, else push over /v1/weights/update", param="path") from err
        if not tensors:
            raise APIError(400, "the shared safetensors file holds no tensors", param="path")
        return await apply(tensors, body.weight_version, body.policy, False, body.allow_non_finite,
                           body.allow_version_rollback, body.recompute_kv, body.dry_run, body.keep_previous)

    async def apply(tensors, version, policy, require_all, allow_non_finite, allow_version_rollback,
                    recompute_kv, dry_run, keep_previous) -> dict:
        try:
            new_version = await server.front.update_weights(tensors, version, policy, require_all, allow_non_finite,
                                                            allow_version_rollback, recompute_kv, dry_run=dry_run,
                                                            keep_previous=keep_previous)
        except WeightUpdateError as err:
            raise APIError(400, str(err), param=err.param) from err
        # A quantized engine keeps the pushed weights in its block formats (quantized to nearest): it says so.
        quantized = server.engine.loaded.quantization
        return {"weight_version": new_version, "num_parameters": len(tensors), **({"dry_run": True} if dry_run else {}),
                **({"quantized_as": quantized} if quantized else {})}

