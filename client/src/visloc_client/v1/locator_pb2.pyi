from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_SWC: _ClassVar[Method]
    METHOD_CELL: _ClassVar[Method]
METHOD_UNSPECIFIED: Method
METHOD_SWC: Method
METHOD_CELL: Method

class LocateOptions(_message.Message):
    __slots__ = ("top_k", "eps_km", "conf_scale_km", "conf_threshold", "return_neighbours", "return_top_cells", "claims", "claim_radius_km", "claim_neighbours")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EPS_KM_FIELD_NUMBER: _ClassVar[int]
    CONF_SCALE_KM_FIELD_NUMBER: _ClassVar[int]
    CONF_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    RETURN_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOP_CELLS_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    CLAIM_RADIUS_KM_FIELD_NUMBER: _ClassVar[int]
    CLAIM_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    eps_km: float
    conf_scale_km: float
    conf_threshold: float
    return_neighbours: int
    return_top_cells: int
    claims: _containers.RepeatedCompositeFieldContainer[Claim]
    claim_radius_km: float
    claim_neighbours: int
    def __init__(self, top_k: _Optional[int] = ..., eps_km: _Optional[float] = ..., conf_scale_km: _Optional[float] = ..., conf_threshold: _Optional[float] = ..., return_neighbours: _Optional[int] = ..., return_top_cells: _Optional[int] = ..., claims: _Optional[_Iterable[_Union[Claim, _Mapping]]] = ..., claim_radius_km: _Optional[float] = ..., claim_neighbours: _Optional[int] = ...) -> None: ...

class Claim(_message.Message):
    __slots__ = ("lat", "lon")
    LAT_FIELD_NUMBER: _ClassVar[int]
    LON_FIELD_NUMBER: _ClassVar[int]
    lat: float
    lon: float
    def __init__(self, lat: _Optional[float] = ..., lon: _Optional[float] = ...) -> None: ...

class ClaimCheck(_message.Message):
    __slots__ = ("claim", "mass", "cell", "rank", "cell_distance_km", "distance_km", "neighbours")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    MASS_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CELL_DISTANCE_KM_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_KM_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    claim: Claim
    mass: _containers.RepeatedCompositeFieldContainer[ScaleDensity]
    cell: Cell
    rank: int
    cell_distance_km: float
    distance_km: float
    neighbours: _containers.RepeatedCompositeFieldContainer[ClaimNeighbour]
    def __init__(self, claim: _Optional[_Union[Claim, _Mapping]] = ..., mass: _Optional[_Iterable[_Union[ScaleDensity, _Mapping]]] = ..., cell: _Optional[_Union[Cell, _Mapping]] = ..., rank: _Optional[int] = ..., cell_distance_km: _Optional[float] = ..., distance_km: _Optional[float] = ..., neighbours: _Optional[_Iterable[_Union[ClaimNeighbour, _Mapping]]] = ...) -> None: ...

class ClaimNeighbour(_message.Message):
    __slots__ = ("row_id", "similarity", "lat", "lon", "distance_km")
    ROW_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    LAT_FIELD_NUMBER: _ClassVar[int]
    LON_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_KM_FIELD_NUMBER: _ClassVar[int]
    row_id: int
    similarity: float
    lat: float
    lon: float
    distance_km: float
    def __init__(self, row_id: _Optional[int] = ..., similarity: _Optional[float] = ..., lat: _Optional[float] = ..., lon: _Optional[float] = ..., distance_km: _Optional[float] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("image", "options", "request_id", "pixels")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    options: LocateOptions
    request_id: str
    pixels: Pixels
    def __init__(self, image: _Optional[bytes] = ..., options: _Optional[_Union[LocateOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., pixels: _Optional[_Union[Pixels, _Mapping]] = ...) -> None: ...

class Pixels(_message.Message):
    __slots__ = ("data", "height", "width", "source_width", "source_height", "preprocessing", "exif_transpose")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    EXIF_TRANSPOSE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    source_width: int
    source_height: int
    preprocessing: str
    exif_transpose: bool
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., source_width: _Optional[int] = ..., source_height: _Optional[int] = ..., preprocessing: _Optional[str] = ..., exif_transpose: _Optional[bool] = ...) -> None: ...

class Cell(_message.Message):
    __slots__ = ("id", "lat", "lon", "probability")
    ID_FIELD_NUMBER: _ClassVar[int]
    LAT_FIELD_NUMBER: _ClassVar[int]
    LON_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    id: int
    lat: float
    lon: float
    probability: float
    def __init__(self, id: _Optional[int] = ..., lat: _Optional[float] = ..., lon: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("row_id", "similarity", "lat", "lon", "cluster", "in_prediction")
    ROW_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    LAT_FIELD_NUMBER: _ClassVar[int]
    LON_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    IN_PREDICTION_FIELD_NUMBER: _ClassVar[int]
    row_id: int
    similarity: float
    lat: float
    lon: float
    cluster: int
    in_prediction: bool
    def __init__(self, row_id: _Optional[int] = ..., similarity: _Optional[float] = ..., lat: _Optional[float] = ..., lon: _Optional[float] = ..., cluster: _Optional[int] = ..., in_prediction: _Optional[bool] = ...) -> None: ...

class ScaleDensity(_message.Message):
    __slots__ = ("scale_km", "density")
    SCALE_KM_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    scale_km: float
    density: float
    def __init__(self, scale_km: _Optional[float] = ..., density: _Optional[float] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_ms", "preprocess_ms", "queue_ms", "triton_ms", "swc_ms", "pd_ms", "total_ms", "claim_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TRITON_MS_FIELD_NUMBER: _ClassVar[int]
    SWC_MS_FIELD_NUMBER: _ClassVar[int]
    PD_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    CLAIM_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    preprocess_ms: float
    queue_ms: float
    triton_ms: float
    swc_ms: float
    pd_ms: float
    total_ms: float
    claim_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., triton_ms: _Optional[float] = ..., swc_ms: _Optional[float] = ..., pd_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., claim_ms: _Optional[float] = ...) -> None: ...

class LocateResponse(_message.Message):
    __slots__ = ("request_id", "lat", "lon", "method", "top_cell", "confidence", "localizable", "prediction_density", "neighbours", "top_cells", "model_version", "background_version", "timings", "image_width", "image_height", "input_width", "input_height", "batch_size", "claims")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAT_FIELD_NUMBER: _ClassVar[int]
    LON_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TOP_CELL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LOCALIZABLE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_DENSITY_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    TOP_CELLS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lat: float
    lon: float
    method: Method
    top_cell: Cell
    confidence: float
    localizable: bool
    prediction_density: _containers.RepeatedCompositeFieldContainer[ScaleDensity]
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    top_cells: _containers.RepeatedCompositeFieldContainer[Cell]
    model_version: str
    background_version: str
    timings: StageTimings
    image_width: int
    image_height: int
    input_width: int
    input_height: int
    batch_size: int
    claims: _containers.RepeatedCompositeFieldContainer[ClaimCheck]
    def __init__(self, request_id: _Optional[str] = ..., lat: _Optional[float] = ..., lon: _Optional[float] = ..., method: _Optional[_Union[Method, str]] = ..., top_cell: _Optional[_Union[Cell, _Mapping]] = ..., confidence: _Optional[float] = ..., localizable: _Optional[bool] = ..., prediction_density: _Optional[_Iterable[_Union[ScaleDensity, _Mapping]]] = ..., neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., top_cells: _Optional[_Iterable[_Union[Cell, _Mapping]]] = ..., model_version: _Optional[str] = ..., background_version: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., input_width: _Optional[int] = ..., input_height: _Optional[int] = ..., batch_size: _Optional[int] = ..., claims: _Optional[_Iterable[_Union[ClaimCheck, _Mapping]]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LocateStreamResponse(_message.Message):
    __slots__ = ("request_id", "index", "result", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    result: LocateResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., result: _Optional[_Union[LocateResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("service_version", "model_name", "model_version", "bundle_id", "bundle_source", "background_version", "num_cells", "num_background", "embedding_dim", "pd_scales_km", "defaults", "max_image_bytes", "max_image_pixels", "preprocessing", "bundle_warning", "exif_transpose", "max_input_side", "accepts_pixels", "fast_decode")
    SERVICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_CELLS_FIELD_NUMBER: _ClassVar[int]
    NUM_BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    PD_SCALES_KM_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_WARNING_FIELD_NUMBER: _ClassVar[int]
    EXIF_TRANSPOSE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_SIDE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PIXELS_FIELD_NUMBER: _ClassVar[int]
    FAST_DECODE_FIELD_NUMBER: _ClassVar[int]
    service_version: str
    model_name: str
    model_version: str
    bundle_id: str
    bundle_source: str
    background_version: str
    num_cells: int
    num_background: int
    embedding_dim: int
    pd_scales_km: _containers.RepeatedScalarFieldContainer[float]
    defaults: LocateOptions
    max_image_bytes: int
    max_image_pixels: int
    preprocessing: str
    bundle_warning: str
    exif_transpose: bool
    max_input_side: int
    accepts_pixels: bool
    fast_decode: bool
    def __init__(self, service_version: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., bundle_id: _Optional[str] = ..., bundle_source: _Optional[str] = ..., background_version: _Optional[str] = ..., num_cells: _Optional[int] = ..., num_background: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., pd_scales_km: _Optional[_Iterable[float]] = ..., defaults: _Optional[_Union[LocateOptions, _Mapping]] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., preprocessing: _Optional[str] = ..., bundle_warning: _Optional[str] = ..., exif_transpose: _Optional[bool] = ..., max_input_side: _Optional[int] = ..., accepts_pixels: _Optional[bool] = ..., fast_decode: _Optional[bool] = ...) -> None: ...
