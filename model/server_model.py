"""The registered model `forja serve` answers with, and the thread that follows its alias.

A model URI is models:/NAME@ALIAS (followed: when the alias moves in the registry, the new version is
loaded off the request path and swapped in) or models:/NAME/VERSION (pinned). Versions are resolved
and downloaded with tasks.models.registry (the weights' sha256 checked against the version's
weights_sha256 tag in the registry, never against a file in the model folder), then loaded on the
placement model.device.resolve picked (CUDA bf16 when present, else CPU fp32).
"""
from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from model.chat import EOT, ChatTemplate, plain_tokenizer
from model.device import Placement
from model.generate import load_folder

log = logging.getLogger("forja.serve")


class ModelUnavailable(LookupError):
    """The model URI names no version in the registry (the message lists what is registered)."""


@dataclass(eq=False)  # compared by identity: the engine batches the requests of one loaded object
class ServedModel:
    name: str
    version: str
    model: object  # model.gpt.GPT, in eval mode on its placement
    tokenizer: object  # tokenizers.Tokenizer
    placement: Placement

    def __post_init__(self) -> None:
        self.plain = plain_tokenizer(self.tokenizer)  # user text never becomes a special token
        self.eot_id = self.tokenizer.token_to_id(EOT)
        try:
            self.template: ChatTemplate | None = ChatTemplate(self.tokenizer)
        except ValueError:  # a tokenizer from before forja reserved the chat tokens
            self.template = None
        # a token covers at most this many characters: a longer prompt is refused untokenized
        self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())

    @property
    def label(self) -> str:
        """NAME/VERSION: the `model` field of every response and the X-Forja-Model-Version header."""
        return f"{self.name}/{self.version}"

    @property
    def block_size(self) -> int:
        return self.model.cfg.block_size


def split_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of models:/NAME@ALIAS or models:/NAME/VERSION."""
    if not uri.startswith("models:/"):
        raise ModelUnavailable(f"serve.model_uri {uri!r} is not a model URI; use models:/NAME@ALIAS or "
                               "models:/NAME/VERSION")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name or not version:
        raise ModelUnavailable(f"serve.model_uri {uri!r}: write models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, None, version


def registered_models(client) -> str:
    """Every registered model with its aliases, for error messages: 'a (champion -> 2), b (no alias)'."""
    parts = []
    for m in sorted(client.search_registered_models(), key=lambda m: m.name):
        aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(m.aliases.items())) or "no alias"
        parts.append(f"{m.name} ({aliases})")
    return "; ".join(parts) or "none"


def resolve(client, uri: str):
    """The model version the URI points to now, or ModelUnavailable naming the registered models."""
    from mlflow.exceptions import MlflowException

    from tasks.models import registry

    split_uri(uri)
    try:
        return registry.resolve(client, uri)
    except registry.ModelNotFound as e:
        try:
            known = registered_models(client)
        except MlflowException:
            known = "(the registry could not be listed)"
        raise ModelUnavailable(f"serve.model_uri {uri}: {str(e).split(' Registered models:')[0]} Registered "
                               f"models and their aliases: {known}. Pick one with forja serve "
                               "models:/NAME@ALIAS or models:/NAME/VERSION") from None


def load(client, version, placement: Placement) -> ServedModel:
    """Download a version, check its weights against the registry's sha256, load it on placement."""
    from tasks.models import registry

    with tempfile.TemporaryDirectory(prefix="forja-serve-") as tmp:
        folder = registry.download(client, version, Path(tmp))  # raises TamperedWeights on a bad sha256
        model, tokenizer = load_folder(folder, placement.device, placement.torch_dtype)
    return ServedModel(str(version.name), str(version.version), model, tokenizer, placement)


class Follower:
    """Holds the current ServedModel; for an alias URI, a thread looks the alias up every refresh_s
    seconds and swaps in the version it points to once loaded. A version that fails to load (its
    weights do not match the registry, the download broke) is logged and skipped; the current one
    keeps answering."""

    def __init__(self, client, uri: str, placement: Placement, refresh_s: float):
        self.client, self.uri, self.placement, self.refresh_s = client, uri, placement, refresh_s
        self.name, self.alias, _ = split_uri(uri)
        self.current = load(client, resolve(client, uri), placement)
        self.failed: dict[str, str] = {}  # version -> why it was not loaded
        self.swaps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.alias is None:
            return  # pinned: never moves
        self._thread = threading.Thread(target=self._run, name="forja-alias-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def check(self) -> bool:
        """Look the alias up once; load and swap in a new version. True when it swapped."""
        version = resolve(self.client, self.uri)
        number = str(version.version)
        if number == self.current.version or number in self.failed:
            return False
        try:
            fresh = load(self.client, version, self.placement)
        except Exception as e:  # noqa: BLE001 - any failure keeps the current version serving
            self.failed[number] = f"{type(e).__name__}: {e}"
            log.error("%s now points to version %s, which was NOT loaded (%s); still serving %s", self.uri, number,
                      self.failed[number], self.current.label)
            return False
        old, self.current = self.current, fresh  # one assignment: a request sees the old or the new one
        self.swaps += 1
        log.info("%s moved: serving %s (was %s)", self.uri, fresh.label, old.label)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - the registry may be down for a while
                log.warning("could not look up %s (%s: %s); still serving %s", self.uri, type(e).__name__, e,
                            self.current.label)
