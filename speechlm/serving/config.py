"""The server's settings (speechlm.serving.server): one typed dataclass, checked before any model loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from speechlm.errors import ConfigError


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # localhost unless told otherwise
    port: int = 8000  # 0: any free port
    api_key: str = ""  # "": no key; else every /v1 request needs "Authorization: Bearer <key>"
    model_name: str = "speechlm"  # the id /v1/models lists and requests name
    max_batch: int = 8  # requests decoded together at most
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others
    queue_size: int = 32  # requests waiting for the model at most; more: 429 with Retry-After
    max_upload_bytes: int = 20 * 1024 * 1024  # decoded audio bytes of one request (413 beyond)
    max_audio_s: float = 120.0  # seconds of audio per request (400 beyond)
    max_tokens: int = 256  # the most max_tokens a request may ask for (400 beyond)
    default_max_tokens: int = 64  # when a request does not say
    request_timeout_s: float = 120.0  # from arrival to the last token (504 beyond)
    retry_after_s: int = 1  # the Retry-After of a 429
    stream_hop_s: float = 0.5  # streaming speech in: re-encode after this much new audio
    stream_margin_s: float = 0.2  # a token is closed once this much audio follows its boundary
    stream_context_s: float = 0.0  # > 0: re-encode only this much audio before the last closed token (0: all)
    stream_max_sessions: int = 4  # open WebSocket sessions at most

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, f"port must be 0..65535, got {self.port}"),
            (self.max_batch >= 1, f"max_batch must be at least 1, got {self.max_batch}"),
            (self.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {self.max_wait_ms}"),
            (self.queue_size >= 1, f"queue_size must be at least 1, got {self.queue_size}"),
            (self.max_upload_bytes > 0, f"max_upload_bytes must be positive, got {self.max_upload_bytes}"),
            (self.max_audio_s > 0, f"max_audio_s must be positive, got {self.max_audio_s}"),
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (1 <= self.default_max_tokens <= self.max_tokens,
             f"default_max_tokens must be 1..max_tokens ({self.max_tokens}), got {self.default_max_tokens}"),
            (self.request_timeout_s > 0, f"request_timeout_s must be positive, got {self.request_timeout_s}"),
            (self.retry_after_s >= 0, f"retry_after_s must be >= 0, got {self.retry_after_s}"),
            (self.stream_hop_s > 0, f"stream_hop_s must be positive, got {self.stream_hop_s}"),
            (self.stream_margin_s >= 0, f"stream_margin_s must be >= 0, got {self.stream_margin_s}"),
            (self.stream_context_s >= 0, f"stream_context_s must be >= 0, got {self.stream_context_s}"),
            (self.stream_max_sessions >= 1, f"stream_max_sessions must be at least 1, got {self.stream_max_sessions}"),
            (bool(self.model_name), "model_name must not be empty"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"server config: {msg}")

    @classmethod
    def from_dict(cls, values: dict) -> ServerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"server config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**values)
