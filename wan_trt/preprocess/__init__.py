"""``wan-trt preprocess``: a raw driving video and a reference photo -> the official preprocessed folder.

The official Wan-Animate preprocessing runs YOLOv10 + ViTPose-H whole-body (133 COCO-WholeBody
keypoints) + SAM-2, whose weights cannot be had here. This package uses MediaPipe 0.10.14
Holistic instead (its wheel ships the models; ``pip install 'wan-trt[preprocess]'``) and maps
its landmarks onto the keypoints the official code draws, then renders them the same way.

Written (see :mod:`wan_trt.preprocess.folder`): ``src_ref.png`` (the photo, as PNG),
``src_pose.mp4`` (the skeleton), ``src_face.mp4`` (512x512 face crops) and, with
``--mode replace``, ``src_bg.mp4`` (the frame with the person's area blacked out) and
``src_mask.mp4`` (that area in white).

Keypoint mapping (MediaPipe -> the official 20-point body, built from COCO-WholeBody)::

    body joint        official (COCO-WholeBody index)   MediaPipe Pose landmark
    0  nose           0 nose                            0 nose
    1  neck           mid(5, 6) shoulders               mid(11, 12) shoulders
    2  right shoulder 6                                 12
    3  right elbow    8                                 14
    4  right wrist    10                                16
    5  left shoulder  5                                 11
    6  left elbow     7                                 13
    7  left wrist     9                                 15
    8  right hip      12                                24
    9  right knee     14                                26
    10 right ankle    16                                28
    11 left hip       11                                23
    12 left knee      13                                25
    13 left ankle     15                                27
    14 right eye      2                                 5 (right eye centre)
    15 left eye       1                                 2 (left eye centre)
    16 right ear      4                                 8
    17 left ear       3                                 7
    18 left toe       mid(17, 18) big and small toe     31 left foot index
    19 right toe      mid(20, 21)                       32 right foot index

Scores: the body uses MediaPipe's per-landmark visibility (the neck: the smaller of the two
shoulders'); hands and face have no per-point score and get 1 where MediaPipe found them,
0 elsewhere. Hands (COCO-WholeBody 91-111 left, 112-132 right) take MediaPipe Hands' 21 points
as they are: both use the order wrist, then thumb, index, middle, ring, little finger, base to
tip. The 68 face points (COCO-WholeBody 23-90, the iBUG 300-W layout) are picked from the
468-point face mesh by :data:`~wan_trt.preprocess.estimator.FACE68_FROM_MESH`; they are not
drawn in the skeleton (the official drawing does not draw them either) and set the face crop.
Heels (COCO-WholeBody 19, 22) are not used by the official skeleton.

Rendering (:mod:`~wan_trt.preprocess.skeleton`): the official limb pairs and colours, stick
width ``max(min(H, W) // 200 - 1, 1)``, threshold 0.5. Face crops: the 68 points' box grown to
1.3x its area (the extra height mostly above), resized to 512x512, as the official code does.
Retargeting (:mod:`~wan_trt.preprocess.retarget`): one scale and offset onto the reference
person; the official per-bone rescaling is not done. Missing detections: the last good frame
is carried over for up to ``max_gap`` frames; a longer absence is an error naming the frames.
Differences from the official pipeline beyond the estimator: the frame rate is kept (the
official default resamples to 30 fps), and the person mask is MediaPipe's segmentation
(dilated and filled to its box, the official defaults) instead of SAM-2's.
"""

from wan_trt.preprocess.folder import PreprocessResult, preprocess

__all__ = ["PreprocessResult", "preprocess"]
