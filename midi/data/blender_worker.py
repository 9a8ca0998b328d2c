"""The Blender side of ``--renderer blender``: a long-lived process that renders one scene per request.

Run by :mod:`midi.data.blender` as ``<python with bpy> -P blender_worker.py`` (``-P``: this folder is
not put on ``sys.path``, so no module here can shadow one of Blender's add-ons). It imports
only the standard library, numpy and bpy, since its interpreter is the one bpy is installed in
(bpy 4.5 needs numpy < 2, so that is usually a separate environment; see requirements-blender.txt).

Protocol: one JSON request per line on stdin; the reply is one line ``@@MIDI@@ <json>`` on stdout
(Blender's own log lines go there too and are ignored). A request names the scene's source files
(each with the object id its meshes get and the bounding box trimesh found for it), the
normalisation, the cameras (records of :mod:`midi.data.camera`), the render settings and an
output folder; the reply lists the files written per view (``rgb`` and ``relit`` PNGs, ``ids``
as .npy) or ``{"ok": false, "reason": ...}``. End of stdin ends the process.

Frames: our frame is trimesh's (Y up); Blender's world is Z up. Blender's glTF importer turns Y up
into Z up itself; OBJ, PLY and STL are imported without any axis change, so every file's meshes
are mapped by ``A @ N @ C^-1`` (C: the importer's conversion, N: the scene normalisation, A: ours
to Blender's). Each object's resulting bounding box is compared with trimesh's before rendering:
an importer that reads a file differently (another node set, other transforms) is a clear error
instead of a silently misaligned id map.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path

import bpy
import numpy as np

MARK = "@@MIDI@@ "
# Ours (Y up) to Blender's world (Z up): (x, y, z) -> (x, -z, y), as the glTF importer converts.
Y_UP_TO_Z_UP = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)
BBOX_TOLERANCE = 2e-3  # in normalised units (the scene spans 2): far below a pixel at 512 px
CV_TO_BLENDER_CAMERA = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV camera axes (y down, z forward) to Blender's


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = render_request(json.loads(line))
        except SceneError as exc:
            reply = {"ok": False, "reason": str(exc)}
        except Exception as exc:  # a Blender failure on one scene must not end the worker
            reply = {"ok": False, "reason": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc(limit=4)}
        sys.stdout.write(MARK + json.dumps(reply) + "\n")
        sys.stdout.flush()


class SceneError(Exception):
    """A scene this worker cannot render (the message is the one-line reason)."""


def render_request(req: dict) -> dict:
    start = time.perf_counter()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    normalise = _normalisation(req["normalization"])
    for obj in req["objects"]:
        _import_object(obj, normalise)
    _check_bboxes(req["objects"])
    _setup_render(scene, req)
    out = Path(req["out"])
    views, seconds = [], []
    for k, camera in enumerate(req["cameras"]):
        _set_camera(scene, camera)
        t = time.perf_counter()
        view = {"rgb": _render(scene, req, req["lighting"], 0, out / f"rgb_{k}.png", ids=out / f"ids_{k}.npy")}
        view["ids"] = str(out / f"ids_{k}.npy")
        if req["relight"]:
            view["relit"] = _render(scene, req, req["lighting"], 1, out / f"relit_{k}.png")
        seconds.append(time.perf_counter() - t)
        views.append(view)
    return {"ok": True, "views": views, "seconds_per_view": seconds, "seconds": time.perf_counter() - start,
            "device": scene.cycles.device}


def _normalisation(norm: dict) -> np.ndarray:
    matrix = np.eye(4) * float(norm["scale"])
    matrix[3, 3] = 1.0
    matrix[:3, 3] = -np.asarray(norm["center"], np.float64) * float(norm["scale"])
    return Y_UP_TO_Z_UP @ matrix


def _import_object(obj: dict, normalise: np.ndarray) -> None:
    """Imports one source file (or one node of it), maps it into the scene frame, tags its meshes with the id."""
    path = Path(obj["path"])
    suffix = path.suffix.lower()
    before = set(bpy.data.objects)
    if suffix in (".glb", ".gltf"):
        bpy.ops.import_scene.gltf(filepath=str(path))
        importer = Y_UP_TO_Z_UP  # the glTF importer's own Y-up to Z-up conversion
    elif suffix == ".obj":
        bpy.ops.wm.obj_import(filepath=str(path), forward_axis="Y", up_axis="Z")
        importer = np.eye(4)
    elif suffix == ".ply":
        bpy.ops.wm.ply_import(filepath=str(path), forward_axis="Y", up_axis="Z")
        importer = np.eye(4)
    elif suffix == ".stl":
        bpy.ops.wm.stl_import(filepath=str(path), forward_axis="Y", up_axis="Z")
        importer = np.eye(4)
    else:
        raise SceneError(f"{path.name}: Blender cannot import {suffix} files")
    new = [o for o in bpy.data.objects if o not in before]
    for o in [o for o in new if o.type in ("CAMERA", "LIGHT")]:  # the file's own cameras and lamps
        bpy.data.objects.remove(o, do_unlink=True)
    new = [o for o in bpy.data.objects if o not in before]
    meshes = [o for o in new if o.type == "MESH"]
    if obj.get("node"):
        names = sorted(_node_name(o) for o in meshes)
        meshes = [o for o in meshes if _node_name(o) == obj["node"]]
        if not meshes:
            raise SceneError(f"{path.name}#{obj['node']}: Blender's importer made no such node "
                             f"(it made {', '.join(names[:4]) or 'none'}); use --renderer embree")
        for o in (o for o in new if o.type == "MESH" and o not in meshes):
            bpy.data.objects.remove(o, do_unlink=True)  # the file's other instances are other objects
    if not meshes:
        raise SceneError(f"{path.name}{'#' + obj['node'] if obj.get('node') else ''}: Blender imported no mesh")
    transform = normalise @ np.linalg.inv(importer)
    for root in (o for o in bpy.data.objects if o not in before and o.parent is None):
        root.matrix_world = _matrix(transform @ np.asarray(root.matrix_world))
    for o in meshes:
        o.pass_index = int(obj["id"])
        o["midi_id"] = int(obj["id"])
        _colour_attribute_material(o)


def _node_name(o) -> str:
    # Blender suffixes duplicate names (".001"); the glTF importer keeps the node's name otherwise.
    name = o.name
    return name.rsplit(".", 1)[0] if len(name) > 4 and name[-4] == "." and name[-3:].isdigit() else name


def _matrix(array: np.ndarray):
    from_rows = [list(map(float, row)) for row in array]
    return type(bpy.context.scene.cursor.matrix)(from_rows)


def _colour_attribute_material(o) -> None:
    """A mesh with vertex colours and no material gets one that shows them (PLY files, untextured glTF)."""
    mesh = o.data
    if mesh.materials or not mesh.color_attributes:
        return
    material = bpy.data.materials.new(f"{o.name}_vertex_colours")
    material.use_nodes = True
    nodes = material.node_tree.nodes
    attribute = nodes.new("ShaderNodeVertexColor")
    attribute.layer_name = mesh.color_attributes[0].name
    material.node_tree.links.new(attribute.outputs["Color"], nodes["Principled BSDF"].inputs["Base Color"])
    mesh.materials.append(material)


def _check_bboxes(objects: list[dict]) -> None:
    """Every object's Blender bounding box (back in our frame) must be trimesh's."""
    to_ours = np.linalg.inv(Y_UP_TO_Z_UP)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    points: dict[int, list[np.ndarray]] = {}
    for o in (o for o in bpy.data.objects if o.type == "MESH" and "midi_id" in o):
        evaluated = o.evaluated_get(depsgraph)
        mesh = evaluated.to_mesh()
        co = np.empty(len(mesh.vertices) * 3, np.float64)
        mesh.vertices.foreach_get("co", co)
        evaluated.to_mesh_clear()
        world = np.asarray(o.matrix_world) @ np.c_[co.reshape(-1, 3), np.ones(len(co) // 3)].T
        points.setdefault(int(o["midi_id"]), []).append((to_ours @ world)[:3].T)
    for obj in objects:
        found = np.concatenate(points.get(int(obj["id"]), [np.zeros((0, 3))]))
        if not len(found):
            raise SceneError(f"{Path(obj['path']).name}: Blender imported no vertices")
        error = float(np.abs(np.stack([found.min(0), found.max(0)]) - np.asarray(obj["bbox"])).max())
        if error > BBOX_TOLERANCE:
            raise SceneError(f"{Path(obj['path']).name}{'#' + obj['node'] if obj.get('node') else ''}: Blender's "
                             f"import differs from trimesh's (bounding box off by {error:.3g})")


def _setup_render(scene, req: dict) -> None:
    scene.render.engine = "CYCLES"
    scene.cycles.samples = int(req["samples"])
    scene.cycles.use_denoising = bool(req["denoise"])
    scene.cycles.device = _device(req["device"])
    scene.render.resolution_x = scene.render.resolution_y = int(req["size"])
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True  # composited over the background afterwards, exactly
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.image_settings.color_depth = "8"
    scene.view_settings.view_transform = "Standard"  # textures keep their colours (no filmic curve)
    scene.view_layers[0].use_pass_object_index = True
    scene.render.threads_mode = "FIXED"
    scene.render.threads = max(1, int(req.get("threads", 1)))


def _device(wanted: str) -> str:
    if wanted == "cpu":
        return "CPU"
    prefs = bpy.context.preferences.addons["cycles"].preferences
    for kind in (("OPTIX", "CUDA") if wanted == "auto" else (wanted.upper(),)):
        try:
            prefs.compute_device_type = kind
            prefs.get_devices()
        except TypeError:  # this build has no such backend
            continue
        devices = [d for d in prefs.devices if d.type == kind]
        if devices:
            for d in prefs.devices:
                d.use = d.type == kind
            return "GPU"
    return "CPU"


def _set_camera(scene, record: dict) -> None:
    data = bpy.data.cameras.new("midi_camera") if "midi_camera" not in bpy.data.cameras else bpy.data.cameras["midi_camera"]
    camera = bpy.data.objects.get("midi_camera") or bpy.data.objects.new("midi_camera", data)
    if camera.name not in scene.collection.objects:
        scene.collection.objects.link(camera)
    focal = float(record["intrinsics"][1][1])
    data.sensor_fit = "VERTICAL"
    data.angle_y = 2.0 * math.atan(record["height"] / (2.0 * focal))
    data.clip_start = 1e-3
    data.clip_end = 100.0 * float(record["distance"])
    camera_to_world = np.linalg.inv(np.asarray(record["world_to_camera"], np.float64))
    camera.matrix_world = _matrix(Y_UP_TO_Z_UP @ camera_to_world @ CV_TO_BLENDER_CAMERA)
    scene.camera = camera


def _lighting(scene, lighting: str, variant: int) -> None:
    """Lighting preset ``sun_sky`` (a sun and a sky), or an HDRI file; ``variant`` 1 is the re-lit one
    (the sun from another side, lower and warmer; the HDRI turned half around)."""
    world = bpy.data.worlds.get("midi_world") or bpy.data.worlds.new("midi_world")
    scene.world = world
    world.use_nodes = True
    nodes, links = world.node_tree.nodes, world.node_tree.links
    nodes.clear()
    background = nodes.new("ShaderNodeBackground")
    links.new(background.outputs["Background"], nodes.new("ShaderNodeOutputWorld").inputs["Surface"])
    for o in [o for o in bpy.data.objects if o.name.startswith("midi_sun")]:
        bpy.data.objects.remove(o, do_unlink=True)
    if lighting != "sun_sky":
        environment = nodes.new("ShaderNodeTexEnvironment")
        environment.image = bpy.data.images.load(lighting, check_existing=True)
        mapping = nodes.new("ShaderNodeMapping")
        mapping.inputs["Rotation"].default_value[2] = math.pi * variant
        links.new(nodes.new("ShaderNodeTexCoord").outputs["Generated"], mapping.inputs["Vector"])
        links.new(mapping.outputs["Vector"], environment.inputs["Vector"])
        links.new(environment.outputs["Color"], background.inputs["Color"])
        background.inputs["Strength"].default_value = 1.0
        return
    sky = (0.55, 0.65, 0.85) if variant == 0 else (0.45, 0.42, 0.5)
    background.inputs["Color"].default_value = (*sky, 1.0)
    background.inputs["Strength"].default_value = 0.6 if variant == 0 else 0.35
    sun_data = bpy.data.lights.new("midi_sun", "SUN")
    sun_data.energy = 3.0 if variant == 0 else 2.5
    sun_data.angle = math.radians(8.0)
    sun_data.color = (1.0, 0.98, 0.95) if variant == 0 else (1.0, 0.8, 0.6)
    sun = bpy.data.objects.new("midi_sun", sun_data)
    scene.collection.objects.link(sun)
    # In camera-relative terms: over the viewer's left shoulder (as the flat renderer), or low from the right.
    elevation, azimuth = (math.radians(55.0), math.radians(35.0)) if variant == 0 else (math.radians(20), math.radians(-120))
    view = np.asarray(scene.camera.matrix_world)
    back = view[:3, 2] / np.linalg.norm(view[:3, 2])  # from the scene towards the camera
    heading = math.atan2(back[1], back[0]) + azimuth
    direction = np.array([math.cos(elevation) * math.cos(heading), math.cos(elevation) * math.sin(heading),
                          math.sin(elevation)])  # towards the sun
    sun.rotation_mode = "QUATERNION"
    sun.rotation_quaternion = _vector(-direction).to_track_quat("-Z", "Y")


def _vector(v: np.ndarray):
    return type(bpy.context.scene.cursor.location)(tuple(float(x) for x in v))


def _render(scene, req: dict, lighting: str, variant: int, rgb_path: Path, ids: Path | None = None) -> str:
    _lighting(scene, lighting, variant)
    scene.use_nodes = ids is not None
    if ids is not None:
        exr = _index_output(scene, rgb_path.parent / f"{rgb_path.stem}_index")
    scene.render.filepath = str(rgb_path)
    bpy.ops.render.render(write_still=True)
    if ids is not None:
        image = bpy.data.images.load(str(exr))
        values = np.empty(image.size[0] * image.size[1] * image.channels, np.float32)
        image.pixels.foreach_get(values)
        index = values.reshape(image.size[1], image.size[0], image.channels)[::-1, :, 0]  # Blender's rows go up
        np.save(ids, np.rint(index).astype(np.int32))
        bpy.data.images.remove(image)
    return str(rgb_path)


def _index_output(scene, base: Path) -> Path:
    """Compositor: the object-index pass (not anti-aliased) written as a float EXR; returns its path."""
    tree = scene.node_tree
    tree.nodes.clear()
    layers = tree.nodes.new("CompositorNodeRLayers")
    output = tree.nodes.new("CompositorNodeOutputFile")
    output.base_path = str(base.parent)
    output.file_slots[0].path = base.name + "_"
    output.format.file_format = "OPEN_EXR"
    output.format.color_depth = "32"
    output.format.color_mode = "RGB"
    tree.links.new(layers.outputs["IndexOB"], output.inputs[0])
    composite = tree.nodes.new("CompositorNodeComposite")
    tree.links.new(layers.outputs["Image"], composite.inputs["Image"])
    return base.parent / f"{base.name}_{scene.frame_current:04d}.exr"


if __name__ == "__main__":
    main()
