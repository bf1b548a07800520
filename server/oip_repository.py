"""OIP's model repository RPCs (index, load, unload of ``<model-repository>/<name>.pt2``)
over the data plane. Part of ``OipServicer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import Unimplemented
from .model_repository import repository_models
from .model_types import ModelState


class RepositoryRpcs:
    """``inference.GRPCInferenceService``'s ``RepositoryIndex``, ``RepositoryModelLoad`` and
    ``RepositoryModelUnload``."""

    plane: Any  # dataplane.DataPlane
    pb: Any  # the OIP messages
    repository: Path | None

    def RepositoryIndex(self, request, context):
        entry = self.pb.RepositoryIndexResponse.ModelIndex
        loaded = {m.name: m for m in self.plane.list_models()}
        models = []
        for name in sorted(set(loaded) | set(self._repository_names())):
            info = loaded.get(name)
            if info is None:
                models.append(entry(name=name, state="UNAVAILABLE", reason="unloaded"))
                continue
            state = {
                ModelState.READY: "READY",
                ModelState.LOADING: "LOADING",
                ModelState.UNLOADING: "UNLOADING",
            }.get(info.state, "UNAVAILABLE")
            models.append(
                entry(
                    name=name,
                    state=state,
                    reason=info.error,
                    version=info.active_version.id if info.active_version else "",
                )
            )
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return self.pb.RepositoryIndexResponse(models=models)

    def RepositoryModelLoad(self, request, context):
        name = request.model_name
        for key in request.parameters:
            if key == "config" or key.startswith("file:"):
                raise Unimplemented(
                    f"RepositoryModelLoad: the {key!r} parameter is not "
                    "supported; put the package in the model repository"
                )
        if self.plane.model_ready(name):
            return self.pb.RepositoryModelLoadResponse()  # already serving: nothing to do
        self.plane.load_from_repository(name)
        return self.pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self.plane.unload_model(request.model_name)
        return self.pb.RepositoryModelUnloadResponse()

    def _repository_names(self) -> list[str]:
        if self.repository is None or not self.repository.is_dir():
            return []
        return list(repository_models(self.repository))
