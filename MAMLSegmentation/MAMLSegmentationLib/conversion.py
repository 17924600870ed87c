"""Volume node <-> SimpleITK image: the one place where Slicer's RAS meets the engine's LPS.

Slicer stores a volume as voxels (numpy order k, j, i) and a 4x4 IJK-to-RAS matrix; SimpleITK
stores the same voxels (also k, j, i in numpy) with spacing, origin and direction in LPS. With
F = diag(-1, -1, 1): origin_LPS = F origin_RAS and direction_LPS = F direction_RAS.

``slicer.util.itkImageFromVolume`` is not used: it flips the direction but leaves the origin in RAS.
Parent transforms are honoured: what the engine gets is the volume as shown in the views (world
coordinates). A linear parent transform is folded into the geometry; a non-linear one is applied by
resampling a detached copy onto the volume's own grid (what Slicer's "Harden transform" does). The
input node is never modified.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

from .errors import MAMLSegmentationError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijkToRASArray(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return _matrix_to_array(matrix)


def _voxels(volumeNode) -> np.ndarray:
    image = volumeNode.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise MAMLSegmentationError(f"Volume '{volumeNode.GetName()}' has no image data.")
    if image.GetNumberOfScalarComponents() != 1:
        raise MAMLSegmentationError(
            f"Volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
            "voxel; a scalar (grey-level) CT volume is needed."
        )
    shape = tuple(reversed(image.GetDimensions()))
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def checkVolume3D(volumeNode, label: str | None = None) -> None:
    """Raise when the node is not a scalar 3D volume (a 2D image has one slice along some axis)."""
    name = label or volumeNode.GetName()
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise MAMLSegmentationError(f"'{name}' ({volumeNode.GetClassName()}) is not a scalar volume.")
    dims = volumeNode.GetImageData().GetDimensions() if volumeNode.GetImageData() else (0, 0, 0)
    if min(dims) < 1:
        raise MAMLSegmentationError(f"Volume '{name}' has no image data.")
    if min(dims) < 2:
        raise MAMLSegmentationError(
            f"Volume '{name}' is 2D ({dims[0]}x{dims[1]}x{dims[2]} voxels); a 3D CT volume is needed."
        )


def _worldTransform(volumeNode):
    """(linear 4x4 to-world matrix or None, general to-world transform or None)."""
    parent = volumeNode.GetParentTransformNode()
    if parent is None:
        return np.eye(4), None
    if parent.IsTransformToWorldLinear():
        matrix = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(matrix)
        return _matrix_to_array(matrix), None
    general = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, general)
    return None, general


def _hardenedCopy(volumeNode, transformToWorld) -> "slicer.vtkMRMLScalarVolumeNode":
    """A detached copy of the node (not in any scene) with a non-linear transform applied."""
    copy = slicer.vtkMRMLScalarVolumeNode()
    image = vtk.vtkImageData()
    image.DeepCopy(volumeNode.GetImageData())
    copy.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    copy.SetIJKToRASMatrix(matrix)
    copy.ApplyTransform(transformToWorld)
    return copy


def imageFromVolumeNode(volumeNode, worldCoordinates: bool = True) -> sitk.Image:
    """A SimpleITK image (LPS) of a scalar volume node, in world coordinates by default.

    The voxels are copied; the node is left untouched.
    """
    checkVolume3D(volumeNode)
    ijkToRAS = ijkToRASArray(volumeNode)
    source = volumeNode
    if worldCoordinates:
        linear, general = _worldTransform(volumeNode)
        if general is not None:
            source = _hardenedCopy(volumeNode, general)
            ijkToRAS = ijkToRASArray(source)
        else:
            ijkToRAS = linear @ ijkToRAS
    voxels = np.array(_voxels(source), copy=True)
    image = sitk.GetImageFromArray(voxels)
    setImageGeometryFromIJKToRAS(image, ijkToRAS)
    return image


def setImageGeometryFromIJKToRAS(image: sitk.Image, ijkToRAS: np.ndarray) -> None:
    linear = np.asarray(ijkToRAS, float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise MAMLSegmentationError("The volume's IJK-to-RAS matrix is singular (zero spacing).")
    directionRAS = linear / spacing
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in LPS_FROM_RAS @ np.asarray(ijkToRAS, float)[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (LPS_FROM_RAS @ directionRAS).ravel()))


def ijkToRASFromImage(image: sitk.Image) -> np.ndarray:
    if image.GetDimension() != 3:
        raise MAMLSegmentationError(f"Expected a 3D image, got {image.GetDimension()}D.")
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_FROM_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_FROM_RAS @ np.array(image.GetOrigin(), float)
    return matrix


def updateVolumeNodeFromImage(volumeNode, image: sitk.Image) -> None:
    """Put the image's voxels and geometry (LPS -> RAS) into an existing volume node."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MAMLSegmentationError("Only scalar images can be put into a volume node.")
    voxels = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    vtkImage = vtk.vtkImageData()
    vtkImage.SetDimensions(voxels.shape[::-1])
    vtkArray = numpy_support.numpy_to_vtk(voxels.ravel(), deep=True)
    vtkImage.GetPointData().SetScalars(vtkArray)
    volumeNode.SetIJKToRASMatrix(_array_to_matrix(ijkToRASFromImage(image)))
    volumeNode.SetAndObserveImageData(vtkImage)


def addVolumeNodeFromImage(scene, image: sitk.Image, name: str,
                           className: str = "vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(className, name)
    updateVolumeNodeFromImage(node, image)
    node.CreateDefaultDisplayNodes()
    return node


def orientedImageDataFromArray(mask_kji: np.ndarray, ijkToRAS: np.ndarray):
    """A vtkOrientedImageData (what segments store) from a numpy mask and its IJK-to-RAS matrix."""
    oriented = slicer.vtkOrientedImageData()
    oriented.SetDimensions(mask_kji.shape[::-1])
    oriented.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(mask_kji, dtype=np.uint8).ravel(), deep=True)
    )
    oriented.SetImageToWorldMatrix(_array_to_matrix(ijkToRAS))
    return oriented
