"""What a Slicer slice view shows, rendered offscreen with Slicer's own slice logic (slicer-core).

The picture is made by the same code as the Red/Yellow/Green views of the application: the slice
logic blends the background volume (CT, its window/level), the foreground volume (an attention
heatmap with its colour map and opacity) and the label layer, and the segmentations displayable
manager draws the segments' fill and outline. Nothing else is needed: no Qt, no X server; VTK renders
through EGL (Mesa's llvmpipe on a machine without a GPU).

Used to make the extension's screenshot (``benchmarks/render_screenshot.py``) and tested against
known pixels (``Testing/test_slicer_rendering.py``)::

    view = SliceViewRenderer(scene, appLogic, 512, 512)
    view.setLayers(background=venous, foreground=heatmap, foregroundOpacity=0.4)
    view.showSegmentation(segmentationNode)
    view.setSliceCenterRAS(tumorCentroidRAS)
    rgb = view.render()           # (height, width, 3) uint8, top row first
    writePNG(rgb, "view.png")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Before VTK creates a window: EGL straight away (VTK otherwise tries X11 first and logs a warning).
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

import slicer  # noqa: E402

from .errors import MAMLSegmentationError  # noqa: E402

ORIENTATIONS = ("Axial", "Sagittal", "Coronal")
# Slice view bar colours of Slicer's default layout.
VIEW_COLORS = {"Red": (0.95, 0.35, 0.35), "Yellow": (0.93, 0.84, 0.31), "Green": (0.43, 0.69, 0.38)}


def offscreenRenderingAvailable() -> tuple:
    """(True, "") when an offscreen OpenGL window can render here, else (False, why not)."""
    try:
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(True)
        window.SetSize(8, 8)
        renderer = vtk.vtkRenderer()
        renderer.SetBackground(1.0, 0.0, 0.0)
        window.AddRenderer(renderer)
        window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.Update()
        pixels = numpy_support.vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars())
        window.Finalize()
    except Exception as error:  # noqa: BLE001  (any failure means: cannot render here)
        return False, f"offscreen OpenGL failed: {error}"
    if pixels.size == 0 or int(pixels.reshape(-1, pixels.shape[-1] if pixels.ndim > 1 else 1)[0][0]) < 200:
        return False, ("offscreen OpenGL rendered nothing (install Mesa's EGL: libegl1 libegl-mesa0 libgbm1 "
                       "libgl1-mesa-dri)")
    return True, ""


def makeHeadlessScene():
    """A scene with the application logic and the module logics this extension uses (no Qt).

    What Slicer's application sets up at start-up for the Colors, Volumes, Segmentations,
    Transforms and Tables modules; ``slicer.mrmlScene`` is set for ``slicer.util`` helpers.
    Returns (scene, application logic, {name: logic}); keep the logics alive with the scene.
    """
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic() if hasattr(app, "GetColorLogic") and app.GetColorLogic() else None
    if colors is None:
        colors = slicer.vtkSlicerColorLogic()
    if colors.GetMRMLScene() is None:
        colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    logics = {"colors": colors}
    for name, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Transforms", slicer.vtkSlicerTransformLogic),
        ("Tables", slicer.vtkSlicerTablesLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    slicer.mrmlScene = scene
    return scene, app, logics


def loadVolumeNode(scene, path, name=None, labelmap: bool = False):
    """Read a volume file (.nrrd, .nii.gz, .mha) into a new node, as Slicer's "Add data" does."""
    path = Path(path)
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(className, name or path.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise MAMLSegmentationError(f"Cannot read the volume {path}.")
    node.CreateDefaultDisplayNodes()
    return node


def prepareApplicationLogic(scene, appLogic=None):
    """The application logic slice views need (what Slicer's application sets up at start-up).

    Reuses ``appLogic`` when given (it must be the scene's); otherwise creates one with a colour
    logic. Slice logics are collected on it, and the slice-view displayable managers use it.
    """
    if appLogic is None:
        appLogic = slicer.vtkSlicerApplicationLogic()
        appLogic.SetMRMLScene(scene)
        colors = appLogic.GetColorLogic() or slicer.vtkSlicerColorLogic()
        colors.SetMRMLScene(scene)
        colors.AddDefaultColorNodes()
        appLogic.SetModuleLogic("Colors", colors)
    if appLogic.GetSliceLogics() is None:
        appLogic.SetSliceLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(appLogic)
    return appLogic



def _textActor(text: str, size: int, color, bold: bool) -> "vtk.vtkTextActor":
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontSize(int(size))
    prop.SetColor(*color)
    prop.SetBold(bold)
    prop.SetFontFamilyToArial()
    return actor

class SliceViewRenderer:
    """One slice view (like Slicer's Red view) rendered offscreen to a numpy RGB image."""

    def __init__(self, scene, appLogic=None, width: int = 512, height: int = 512, layoutName: str = "Red",
                 orientation: str = "Axial"):
        if orientation not in ORIENTATIONS:
            raise MAMLSegmentationError(f"Unknown slice orientation '{orientation}' ({', '.join(ORIENTATIONS)}).")
        self.scene = scene
        self.appLogic = prepareApplicationLogic(scene, appLogic)
        self.width, self.height = int(width), int(height)

        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(True)
        self.window.SetSize(self.width, self.height)
        self.window.SetMultiSamples(0)
        self.renderer = vtk.vtkRenderer()
        self.renderer.SetBackground(0.0, 0.0, 0.0)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        # Displayable managers reach the interactor (crash without one); it is never started.
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)

        self.sliceLogic = slicer.vtkMRMLSliceLogic()
        self.sliceLogic.SetMRMLApplicationLogic(self.appLogic)
        self.appLogic.GetSliceLogics().AddItem(self.sliceLogic)
        self.sliceLogic.SetMRMLScene(scene)
        # Views are told apart by layout name (each has its own slice and composite node).
        taken = {scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName()
                 for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))}
        name, number = layoutName, 1
        while name in taken:
            number += 1
            name = f"{layoutName}{number}"
        self.sliceNode = self.sliceLogic.AddSliceNode(name)
        self.sliceNode.SetOrientation(orientation)
        self.sliceNode.SetLayoutColor(*VIEW_COLORS.get(layoutName, (0.6, 0.6, 0.6)))

        # The blended layers (background, foreground, label) are an image, not a displayable manager:
        # drawn by an image mapper on an actor added BEFORE any segmentation is shown (draw order).
        # The blend is RGBA with alpha 0 where no layer is opaque: draw its RGB only.
        rgb = vtk.vtkImageExtractComponents()
        rgb.SetComponents(0, 1, 2)
        self._rgb = rgb  # its input (the slice logic's blend) exists once a layer is set
        mapper = vtk.vtkImageMapper()
        mapper.SetInputConnection(rgb.GetOutputPort())
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        self.imageActor = vtk.vtkActor2D()
        self.imageActor.SetMapper(mapper)
        self.renderer.AddViewProp(self.imageActor)

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        if not factory.IsDisplayableManagerRegistered("vtkMRMLSegmentationsDisplayableManager2D"):
            factory.RegisterDisplayableManager("vtkMRMLSegmentationsDisplayableManager2D")
        self.displayableManagers = slicer.vtkMRMLDisplayableManagerGroup()
        self.displayableManagers.Initialize(factory, self.renderer)
        self.displayableManagers.SetMRMLDisplayableNode(self.sliceNode)
        self.sliceLogic.ResizeSliceNode(self.width, self.height)
        self._texts = []

    # --- what is shown ---------------------------------------------------------------------------
    def setLayers(self, background=None, foreground=None, foregroundOpacity: float = 0.0, label=None) -> None:
        composite = self.sliceLogic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(foregroundOpacity) if foreground is not None else 0.0)
        composite.SetLabelVolumeID(label.GetID() if label is not None else None)
        self.sliceLogic.FitSliceToBackground(self.width, self.height)

    def showSegmentation(self, segmentationNode, fill: bool = True, outline: bool = True,
                         fillOpacity: float = 0.5, outlineOpacity: float = 1.0, visibleSegments=None,
                         outlineThickness: int = 2) -> None:
        """Show a segmentation in this view (2D fill and outline, as the Segmentations module does)."""
        segmentationNode.CreateDefaultDisplayNodes()
        display = segmentationNode.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility2DFill(fill)
        display.SetVisibility2DOutline(outline)
        display.SetOpacity2DFill(fillOpacity)
        display.SetOpacity2DOutline(outlineOpacity)
        display.SetSliceIntersectionThickness(int(outlineThickness))
        if visibleSegments is not None:
            segmentation = segmentationNode.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(i)
                name = segmentation.GetSegment(segmentId).GetName()
                display.SetSegmentVisibility(segmentId, name in visibleSegments)

    def setSliceCenterRAS(self, pointRAS) -> None:
        """Put the slice through a point (RAS) and centre the view on it; snapped to voxel centres."""
        point = [float(v) for v in pointRAS]
        self.sliceNode.JumpSliceByCentering(*point)
        self.sliceLogic.SnapSliceOffsetToIJK()

    def setSliceOffset(self, offset: float) -> None:
        self.sliceLogic.SetSliceOffset(float(offset))
        self.sliceLogic.SnapSliceOffsetToIJK()

    def zoom(self, factor: float) -> None:
        """Magnify around the current centre (factor > 1 shows a smaller field of view)."""
        fov = self.sliceNode.GetFieldOfView()
        self.sliceNode.SetFieldOfView(fov[0] / factor, fov[1] / factor, fov[2])

    def addText(self, text: str, x: int, y: int, size: int = 16, color=(1.0, 1.0, 1.0), bold: bool = False,
                alignRight: bool = False, top: bool = True) -> None:
        """Overlay text; (x, y) in pixels from the top-left corner (top=True) of the view."""
        actor = _textActor(text, size, color, bold)
        prop = actor.GetTextProperty()
        prop.SetShadow(True)
        prop.SetJustificationToRight() if alignRight else prop.SetJustificationToLeft()
        prop.SetVerticalJustificationToTop() if top else prop.SetVerticalJustificationToBottom()
        actor.SetDisplayPosition(int(x), int(self.height - y) if top else int(y))
        self.renderer.AddViewProp(actor)
        self._texts.append(actor)

    # --- output ------------------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """The view as an (height, width, 3) uint8 RGB array, top row first."""
        self.sliceLogic.ResizeSliceNode(self.width, self.height)
        connection = self.sliceLogic.GetImageDataConnection()
        self.imageActor.SetVisibility(connection is not None)
        if connection is not None:
            self._rgb.SetInputConnection(connection)
        self.displayableManagers.RequestRender()
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        return np.ascontiguousarray(pixels[::-1, :, :3])

    def close(self) -> None:
        """Release the view and remove its slice and composite nodes from the scene."""
        composite = self.sliceLogic.GetSliceCompositeNode()
        self.displayableManagers.SetMRMLDisplayableNode(None)
        self.appLogic.GetSliceLogics().RemoveItem(self.sliceLogic)
        self.sliceLogic.SetMRMLScene(None)
        for node in (composite, self.sliceNode):
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self.window.Finalize()


def renderText(width: int, height: int, texts: list, background=(0.1, 0.1, 0.1)) -> np.ndarray:
    """A (height, width, 3) uint8 strip with text: texts = [(text, x, y-from-top, size, rgb, bold)]."""
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.SetSize(int(width), int(height))
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(*background)
    window.AddRenderer(renderer)
    for text, x, y, size, color, bold in texts:
        actor = _textActor(text, size, color, bold)
        actor.GetTextProperty().SetVerticalJustificationToCentered()
        actor.SetDisplayPosition(int(x), int(height - y))
        renderer.AddViewProp(actor)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
    window.Finalize()
    return np.ascontiguousarray(pixels)


def colorBar(colorNode, width: int, height: int) -> np.ndarray:
    """A horizontal 0..1 ramp of a colour node (procedural or table) as (height, width, 3) uint8."""
    values = np.linspace(0.0, 1.0, int(width))
    if colorNode.IsA("vtkMRMLProceduralColorNode"):
        function = colorNode.GetColorTransferFunction()
        rgb = np.array([function.GetColor(v) for v in values])
    else:
        table = colorNode.GetLookupTable()
        rgb = np.array([table.GetColor(v * (table.GetNumberOfColors() - 1)) for v in values])
    row = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    return np.repeat(row[np.newaxis], int(height), axis=0)


def composeScreenshot(panels: list, legend: dict, colorNode=None, note: str = "", gap: int = 4,
                      stripHeight: int = 44) -> np.ndarray:
    """Views side by side (``gap`` pixels apart) above a strip with the segment legend, the heatmap
    colour bar (0..1) and a note. ``legend``: {segment name: (r, g, b) in 0..1}."""
    height = max(p.shape[0] for p in panels)
    columns = []
    for index, panel in enumerate(panels):
        if index:
            columns.append(np.full((height, gap, 3), 40, np.uint8))
        columns.append(panel)
    top = np.concatenate(columns, axis=1)
    width = top.shape[1]
    texts, swatches, x = [], [], 14
    for name, color in legend.items():
        if color is None:
            continue
        swatches.append((x, color))
        texts.append((name, x + 24, stripHeight // 2, 15, (0.95, 0.95, 0.95), False))
        x += 24 + 9 * len(name) + 26
    barX, barWidth = x + 10, 160
    if colorNode is not None:
        texts.append(("attention low", barX, stripHeight // 2, 14, (0.95, 0.95, 0.95), False))
        texts.append(("high", barX + 100 + barWidth + 6, stripHeight // 2, 14, (0.95, 0.95, 0.95), False))
    if note:
        noteX = barX + (100 + barWidth + 50 if colorNode is not None else 0)
        texts.append((note, noteX, stripHeight // 2, 13, (0.75, 0.75, 0.75), False))
    strip = renderText(width, stripHeight, texts)
    for sx, color in swatches:
        strip[stripHeight // 2 - 8:stripHeight // 2 + 8, sx:sx + 16] = np.round(np.array(color) * 255)
    if colorNode is not None:
        bar = colorBar(colorNode, barWidth, 14)
        strip[stripHeight // 2 - 7:stripHeight // 2 + 7, barX + 96:barX + 96 + barWidth] = bar
    return np.concatenate([top, strip], axis=0)


def writePNG(rgb: np.ndarray, path) -> Path:
    """Write an (height, width, 3) uint8 array (top row first) as a PNG, atomically."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(rgb[::-1].reshape(-1, rgb.shape[2]), deep=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.png")
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(partial))
    writer.SetInputData(image)
    writer.Write()
    if not partial.is_file() or partial.stat().st_size == 0:
        raise MAMLSegmentationError(f"Cannot write the picture {path}.")
    os.replace(partial, path)
    return path


def readPNG(path) -> np.ndarray:
    """A PNG as an (height, width, channels) uint8 array, top row first."""
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return pixels.reshape(height, width, -1)[::-1]


def ctWindowLevel(volumeNode, window: float = 400.0, level: float = 50.0) -> None:
    """The abdomen soft-tissue window (W400 L50 HU) on a CT volume's display."""
    volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(float(window), float(level))
    grey = volumeNode.GetScene().GetNodeByID("vtkMRMLColorTableNodeGrey") if volumeNode.GetScene() else None
    if grey is not None:
        display.SetAndObserveColorNodeID(grey.GetID())
