//! ONNX Runtime: one environment per process, one session per model, execution provider chosen at
//! load (CUDA when the runtime and the machine have it, else CPU). Calls here block: callers run
//! them on the blocking pool, never on the async runtime.

use crate::domain::contract::{InputType, OnnxOutputs, OnnxSpec};
use crate::domain::result::ModelOutputs;
pub mod bench;

use anyhow::{Context, anyhow};
use ort::environment::Environment;
use ort::ep;
use ort::session::Session;
use ort::value::TensorRef;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// ONNX Runtime itself is process-wide state (the dylib is loaded once and its environment is
/// global), so the one-time load is guarded here; everything else is passed around explicitly.
static RUNTIME: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads the ONNX Runtime library and creates the process's environment (first call only; later
/// calls return the same environment).
pub fn init_runtime(dylib: Option<&Path>) -> anyhow::Result<Environment> {
    RUNTIME
        .get_or_init(|| {
            let path = dylib.map(Path::to_path_buf).unwrap_or_else(|| "libonnxruntime.so".into());
            let builder = ort::init_from(&path).map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {} ({e}); set ORT_DYLIB_PATH to libonnxruntime.so.1.31.x \
                     (`make deps` installs it from the onnxruntime wheel)",
                    path.display()
                )
            })?;
            builder.with_name("onkos").build().map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// An encoder's output for a batch of tiles: the width D, then one row of D values per tile.
pub type TileEmbeddings = (usize, Vec<f32>);

/// Which execution provider runs a session, as ONNX Runtime names it.
pub type Provider = &'static str;
pub const CPU: Provider = "CPUExecutionProvider";
pub const CUDA: Provider = "CUDAExecutionProvider";

/// Which execution provider sessions use (`ONKOS_EXECUTION_PROVIDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChoice {
    /// CUDA when it registers, else CPU (with a warning).
    Auto,
    /// CUDA or nothing: a session that cannot use it fails to load, with ONNX Runtime's reason.
    Cuda,
    Cpu,
}

/// CUDA execution provider settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct CudaSettings {
    pub device_id: i32,
    /// Arena cap per session, in bytes.
    pub memory_limit: Option<usize>,
    /// TF32 tensor cores for float32 products and convolutions.
    pub tf32: bool,
    /// NHWC convolution kernels.
    pub prefer_nhwc: bool,
}

/// How sessions are built: the process's environment, the execution provider, intra-op threads.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub env: Environment,
    pub provider: ProviderChoice,
    pub cuda: CudaSettings,
    pub threads: usize,
    /// Intra-op threads for slide models (0: ONNX Runtime's default).
    pub slide_threads: usize,
}

impl SessionOptions {
    /// The options a configuration asks for. With `cuda`, CUDA/cuDNN libraries that cannot be
    /// preloaded from the configured folders stop start-up; with `auto` they are a warning.
    pub fn from_config(config: &crate::config::Config) -> anyhow::Result<Self> {
        let env = init_runtime(config.ort_dylib_path.as_deref())?;
        let provider = match config.execution_provider.as_str() {
            "cuda" => ProviderChoice::Cuda,
            "cpu" => ProviderChoice::Cpu,
            _ => ProviderChoice::Auto,
        };
        if provider != ProviderChoice::Cpu
            && (config.cuda_library_dir.is_some() || config.cudnn_library_dir.is_some())
            && let Err(e) = ep::cuda::preload_dylibs(
                config.cuda_library_dir.as_deref(),
                config.cudnn_library_dir.as_deref(),
            )
        {
            anyhow::ensure!(
                provider != ProviderChoice::Cuda,
                "ONKOS_EXECUTION_PROVIDER=cuda, but the CUDA libraries cannot be loaded: {e}"
            );
            tracing::warn!(error = %e, "CUDA libraries cannot be loaded; models will run on the CPU");
        }
        Ok(Self {
            env,
            provider,
            cuda: CudaSettings {
                device_id: config.cuda_device_id,
                memory_limit: config.cuda_memory_limit_bytes,
                tf32: config.cuda_tf32,
                prefer_nhwc: config.cuda_prefer_nhwc,
            },
            threads: config.inference_threads,
            slide_threads: config.slide_inference_threads,
        })
    }

    /// The options for one model: slide models get their own thread count.
    pub fn for_model(&self, slide: bool) -> Self {
        let mut options = self.clone();
        if slide {
            options.threads = self.slide_threads;
        }
        options
    }
}

/// One loaded ONNX graph: a matrix input (one row per case, one column per encoded feature) and
/// the outputs the manifest names.
#[derive(Debug)]
pub struct OnnxModel {
    // ort sessions take `&mut self` to run; requests for one model are batched upstream, so one
    // lock per model costs nothing and keeps the session's memory arena warm.
    session: Mutex<Session>,
    input: String,
    input_type: InputType,
    outputs: OnnxOutputs,
    width: usize,
    pub provider: Provider,
    /// The CUDA session's pinned (page-locked) host allocator, for tile batches; made at load so
    /// that allocating a batch never waits for a running inference.
    pinned: Option<Mutex<ort::memory::Allocator>>,
}

impl OnnxModel {
    /// Builds a session from ONNX bytes, checking that the input and outputs the manifest names
    /// exist in the graph.
    pub fn load(
        bytes: &[u8],
        spec: &OnnxSpec,
        width: usize,
        options: &SessionOptions,
    ) -> anyhow::Result<Self> {
        let env = &options.env;
        let threads = options.threads;
        let cuda = Some(options.cuda);
        let (session, provider) = match options.provider {
            ProviderChoice::Cpu => (build_session(env, bytes, threads, None)?, CPU),
            ProviderChoice::Cuda => (
                build_session(env, bytes, threads, cuda).context(
                    "ONKOS_EXECUTION_PROVIDER=cuda, but the CUDA execution provider did not register",
                )?,
                CUDA,
            ),
            ProviderChoice::Auto => match build_session(env, bytes, threads, cuda) {
                Ok(session) => (session, CUDA),
                Err(e) => {
                    warn_cpu_fallback(&e);
                    (build_session(env, bytes, threads, None)?, CPU)
                }
            },
        };
        let names = |outlets: &[ort::value::Outlet]| {
            outlets
                .iter()
                .map(|o| o.name().to_owned())
                .collect::<Vec<_>>()
        };
        let inputs = names(session.inputs());
        let outputs = names(session.outputs());
        anyhow::ensure!(
            inputs.contains(&spec.input),
            "the graph has no input {:?} (it has {inputs:?})",
            spec.input
        );
        for wanted in [
            &spec.outputs.probabilities,
            &spec.outputs.risk_score,
            &spec.outputs.survival,
        ]
        .into_iter()
        .flatten()
        {
            anyhow::ensure!(
                outputs.contains(wanted),
                "the graph has no output {wanted:?} (it has {outputs:?})"
            );
        }
        let pinned = (provider == CUDA)
            .then(|| pinned_allocator(&session, options.cuda.device_id))
            .flatten()
            .map(Mutex::new);
        Ok(Self {
            pinned,
            session: Mutex::new(session),
            input: spec.input.clone(),
            input_type: spec.input_type,
            outputs: spec.outputs.clone(),
            width,
            provider,
        })
    }

    /// Runs `rows` (row-major, `width` values each) and returns each row's outputs.
    pub fn predict(&self, rows: &[f64]) -> anyhow::Result<Vec<ModelOutputs>> {
        let session = self
            .session
            .lock()
            .map_err(|_| anyhow!("an earlier inference panicked"))?;
        self.predict_with(session, rows)
    }

    /// [`predict`](Self::predict) when the session is free; `None` at once when another call holds
    /// it (for a caller that must not block its thread on it).
    pub fn try_predict(&self, rows: &[f64]) -> Option<anyhow::Result<Vec<ModelOutputs>>> {
        match self.session.try_lock() {
            Ok(session) => Some(self.predict_with(session, rows)),
            Err(std::sync::TryLockError::WouldBlock) => None,
            Err(std::sync::TryLockError::Poisoned(_)) => {
                Some(Err(anyhow!("an earlier inference panicked")))
            }
        }
    }

    fn predict_with(
        &self,
        mut session: std::sync::MutexGuard<'_, Session>,
        rows: &[f64],
    ) -> anyhow::Result<Vec<ModelOutputs>> {
        anyhow::ensure!(
            !rows.is_empty() && rows.len().is_multiple_of(self.width),
            "a batch of {} values is not a whole number of rows of {}",
            rows.len(),
            self.width
        );
        let n = rows.len() / self.width;
        let narrow: Vec<f32>;
        let outputs = match self.input_type {
            InputType::Float32 => {
                narrow = rows.iter().map(|v| *v as f32).collect();
                session.run(ort::inputs![self.input.as_str() => TensorRef::from_array_view(([n, self.width], &narrow[..]))?])?
            }
            InputType::Float64 => session.run(ort::inputs![self.input.as_str() => TensorRef::from_array_view(([n, self.width], rows))?])?,
        };
        let mut per_row = vec![ModelOutputs::default(); n];
        if let Some(name) = &self.outputs.probabilities {
            for (row, values) in per_row.iter_mut().zip(matrix(&outputs[name.as_str()], n)?) {
                row.probabilities = Some(values);
            }
        }
        if let Some(name) = &self.outputs.risk_score {
            for (row, values) in per_row.iter_mut().zip(matrix(&outputs[name.as_str()], n)?) {
                row.risk_score = values.first().copied();
            }
        }
        if let Some(name) = &self.outputs.survival {
            for (row, values) in per_row.iter_mut().zip(matrix(&outputs[name.as_str()], n)?) {
                row.survival = Some(values);
            }
        }
        Ok(per_row)
    }

    /// Runs `n` square RGB tiles (`[n, 3, size, size]` float32) and returns, for each of
    /// `outputs` (name, and column of an `[n, C]` output), one value per tile; and, when
    /// `embedding` names an `[n, D]` output, its rows (D, then `n * D` values).
    pub fn predict_tiles(
        &self,
        pixels: &[f32],
        n: usize,
        size: usize,
        outputs: &[(String, Option<usize>)],
        embedding: Option<&str>,
    ) -> anyhow::Result<(Vec<Vec<f64>>, Option<TileEmbeddings>)> {
        anyhow::ensure!(
            n > 0 && pixels.len() == n * 3 * size * size,
            "{} values are not {n} tiles of 3 x {size} x {size}",
            pixels.len()
        );
        let mut session = self
            .session
            .lock()
            .map_err(|_| anyhow!("an earlier inference panicked"))?;
        let result = session.run(ort::inputs![self.input.as_str() => TensorRef::from_array_view(([n, 3, size, size], pixels))?])?;
        tile_outputs(&result, n, n, outputs, embedding)
    }

    /// A buffer for batches of up to `capacity` tiles of `size`: on a CUDA session, page-locked
    /// host memory from the session's pinned allocator, which the GPU reads by DMA instead of
    /// through a staging copy (BENCHMARKS.md, GPU); otherwise ordinary memory.
    pub fn tile_batch(&self, capacity: usize, size: usize) -> TileBatch {
        if let Some(allocator) = &self.pinned
            && let Ok(allocator) = allocator.lock()
        {
            match ort::value::Tensor::<f32>::new(&allocator, [capacity.max(1), 3, size, size]) {
                // Zeroed by ort (the memory is host-accessible), so unused rows are defined.
                Ok(tensor) => return TileBatch::Fixed(tensor),
                Err(e) => {
                    tracing::warn!(error = %e, "no pinned memory for a tile batch; using ordinary memory")
                }
            }
        }
        TileBatch::Host(Vec::new())
    }

    /// [`predict_tiles`](Self::predict_tiles) on the first `n` tiles of a batch buffer. A fixed
    /// (pinned) batch always runs whole (the tiles past `n` are left over from an earlier batch and their
    /// outputs dropped): one input shape per session, so cuDNN's search for the fastest
    /// convolution algorithms, which runs for every new shape, runs once.
    pub fn predict_batch(
        &self,
        batch: &TileBatch,
        n: usize,
        size: usize,
        outputs: &[(String, Option<usize>)],
        embedding: Option<&str>,
    ) -> anyhow::Result<(Vec<Vec<f64>>, Option<TileEmbeddings>)> {
        match batch {
            TileBatch::Host(pixels) => {
                let len = n * 3 * size * size;
                anyhow::ensure!(
                    pixels.len() >= len,
                    "the batch buffer holds fewer than {n} tiles"
                );
                self.predict_tiles(&pixels[..len], n, size, outputs, embedding)
            }
            TileBatch::Fixed(tensor) => {
                let rows = usize::try_from(tensor.shape()[0]).unwrap_or(0);
                anyhow::ensure!(
                    n > 0 && n <= rows && tensor.shape()[2] == size as i64,
                    "{n} tiles of {size} do not fit a batch of shape {:?}",
                    tensor.shape()
                );
                let mut session = self
                    .session
                    .lock()
                    .map_err(|_| anyhow!("an earlier inference panicked"))?;
                let result = session.run(ort::inputs![self.input.as_str() => tensor])?;
                tile_outputs(&result, rows, n, outputs, embedding)
            }
        }
    }

    /// Runs one bag of `n` embeddings (`[n, width]` float32, row-major) through a MIL head: the
    /// bag's probabilities (one row) and, when `attention` names an output, one weight per tile.
    pub fn predict_bag(
        &self,
        embeddings: &[f32],
        n: usize,
        attention: Option<&str>,
    ) -> anyhow::Result<(Vec<f64>, Option<Vec<f64>>)> {
        anyhow::ensure!(
            n > 0 && embeddings.len() == n * self.width,
            "{} values are not {n} embeddings of {}",
            embeddings.len(),
            self.width
        );
        let probabilities = self
            .outputs
            .probabilities
            .as_deref()
            .ok_or_else(|| anyhow!("the manifest names no probabilities output"))?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| anyhow!("an earlier inference panicked"))?;
        let result = session.run(ort::inputs![self.input.as_str() => TensorRef::from_array_view(([n, self.width], embeddings))?])?;
        let flat = |name: &str| -> anyhow::Result<Vec<f64>> {
            let value = result
                .get(name)
                .ok_or_else(|| anyhow!("the model has no output {name:?}"))?;
            flat_values(value)
        };
        let weights = match attention {
            Some(name) => {
                let weights = flat(name)?;
                anyhow::ensure!(
                    weights.len() == n,
                    "output {name} gives {} attention weights for {n} tiles",
                    weights.len()
                );
                Some(weights)
            }
            None => None,
        };
        Ok((flat(probabilities)?, weights))
    }

    /// The names of the graph's outputs.
    pub fn output_names(&self) -> Vec<String> {
        self.session
            .lock()
            .map(|s| s.outputs().iter().map(|o| o.name().to_owned()).collect())
            .unwrap_or_default()
    }
}

/// A CUDA session's pinned host allocator. ONNX Runtime registers it under the session's device
/// or under device 0, depending on its version: both are tried. Without one, tile batches use
/// ordinary memory (slower copies), which is said once as a warning.
fn pinned_allocator(session: &Session, device: i32) -> Option<ort::memory::Allocator> {
    use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
    let mut last = None;
    for id in [device, 0] {
        match MemoryInfo::new(
            AllocationDevice::CUDA_PINNED,
            id,
            AllocatorType::Device,
            MemoryType::CPUInput,
        )
        .and_then(|info| Allocator::new(session, info))
        {
            Ok(allocator) => return Some(allocator),
            Err(e) => last = Some(e),
        }
    }
    tracing::warn!(error = ?last, "the CUDA session has no pinned allocator: tile batches use ordinary memory");
    None
}

/// A batch of tiles on its way to [`OnnxModel::predict_batch`].
#[derive(Debug)]
pub enum TileBatch {
    /// Ordinary host memory, resized to each batch.
    Host(Vec<f32>),
    /// A tensor of a fixed number of tiles, always run whole; on CUDA it is page-locked memory
    /// from the session's pinned allocator ([`OnnxModel::tile_batch`]).
    Fixed(ort::value::Tensor<f32>),
}

impl TileBatch {
    /// The pixels of the first `n` tiles of `tile_len` values each, to be written.
    pub fn pixels_mut(&mut self, n: usize, tile_len: usize) -> anyhow::Result<&mut [f32]> {
        match self {
            Self::Host(pixels) => {
                pixels.resize(n * tile_len, 0.0);
                Ok(&mut pixels[..])
            }
            Self::Fixed(tensor) => {
                let (_, data) = tensor.extract_tensor_mut();
                data.get_mut(..n * tile_len)
                    .ok_or_else(|| anyhow!("{n} tiles do not fit the batch"))
            }
        }
    }
}

/// The outputs of a run over `rows` tiles, for the first `keep` of them.
fn tile_outputs(
    result: &ort::session::SessionOutputs<'_>,
    rows: usize,
    keep: usize,
    outputs: &[(String, Option<usize>)],
    embedding: Option<&str>,
) -> anyhow::Result<(Vec<Vec<f64>>, Option<TileEmbeddings>)> {
    let embeddings = match embedding {
        None => None,
        Some(name) => {
            let value = result
                .get(name)
                .ok_or_else(|| anyhow!("the model has no output {name:?}"))?;
            let (shape, values) = value.try_extract_tensor::<f32>()?;
            let dim = usize::try_from(shape.iter().skip(1).product::<i64>()).unwrap_or(0);
            anyhow::ensure!(
                shape.first() == Some(&(rows as i64)) && dim > 0 && values.len() == rows * dim,
                "output {name} has shape {shape:?}, not [{rows}, D]"
            );
            Some((dim, values[..keep * dim].to_vec()))
        }
    };
    let values = outputs
        .iter()
        .map(|(name, column)| {
            let value = result
                .get(name.as_str())
                .ok_or_else(|| anyhow!("the model has no output {name:?}"))?;
            let matrix = matrix(value, rows)?;
            let per_tile: Vec<f64> = match column {
                None => matrix.into_iter().take(keep).flatten().collect(),
                Some(c) => matrix
                    .iter()
                    .take(keep)
                    .map(|row| {
                        row.get(*c).copied().ok_or_else(|| {
                            anyhow!("output {name} has {} columns, not {}", row.len(), c + 1)
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            anyhow::ensure!(
                per_tile.len() == keep,
                "output {name} gives {} values for {keep} tiles",
                per_tile.len()
            );
            Ok(per_tile)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((values, embeddings))
}

/// Every value of a float output (f32 or f64), whatever its shape.
fn flat_values(value: &ort::value::DynValue) -> anyhow::Result<Vec<f64>> {
    match value.try_extract_tensor::<f32>() {
        Ok((_, v)) => Ok(v.iter().map(|x| f64::from(*x)).collect()),
        Err(_) => Ok(value.try_extract_tensor::<f64>()?.1.to_vec()),
    }
}

/// An [n, k] float output (f32 or f64) as n rows of k values.
fn matrix(value: &ort::value::DynValue, n: usize) -> anyhow::Result<Vec<Vec<f64>>> {
    let (shape, values): (Vec<i64>, Vec<f64>) = match value.try_extract_tensor::<f32>() {
        Ok((shape, v)) => (shape.to_vec(), v.iter().map(|x| f64::from(*x)).collect()),
        Err(_) => {
            let (shape, v) = value.try_extract_tensor::<f64>()?;
            (shape.to_vec(), v.to_vec())
        }
    };
    let width =
        usize::try_from(shape.get(1).copied().unwrap_or(1)).context("negative output dimension")?;
    anyhow::ensure!(
        width > 0 && values.len() == n * width,
        "output shape {shape:?} does not match {n} rows"
    );
    Ok(values.chunks(width).map(<[f64]>::to_vec).collect())
}

/// `auto` fell back to the CPU: said once per process as a warning (every model would repeat it),
/// then at debug level.
fn warn_cpu_fallback(reason: &anyhow::Error) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!(reason = %format!("{reason:#}"), "CUDA execution provider unavailable, using CPU");
    } else {
        tracing::warn!(reason = %format!("{reason:#}"), "CUDA execution provider unavailable: models run on the CPU (ONKOS_EXECUTION_PROVIDER=cuda makes this an error)");
    }
}

fn build_session(
    env: &Environment,
    bytes: &[u8],
    threads: usize,
    cuda: Option<CudaSettings>,
) -> anyhow::Result<Session> {
    let builder = Session::builder(env)?
        .with_intra_threads(threads)
        .map_err(|e| anyhow!("{e}"))?;
    // A session with a thread pool (a slide model's) shares the cores with the tile decoders
    // running beside it: its idle threads sleep instead of spinning on them.
    let builder = if threads == 1 {
        builder
    } else {
        builder
            .with_intra_op_spinning(false)
            .map_err(|e| anyhow!("{e}"))?
    };
    let mut builder = match cuda {
        Some(settings) => {
            let mut provider = ep::CUDA::default()
                .with_device_id(settings.device_id)
                .with_tf32(settings.tf32)
                .with_prefer_nhwc(settings.prefer_nhwc);
            if let Some(limit) = settings.memory_limit {
                provider = provider.with_memory_limit(limit);
            }
            builder
                .with_execution_providers([provider.build().error_on_failure()])
                .map_err(|e| anyhow!("{e}"))?
        }
        None => builder,
    };
    builder
        .commit_from_memory(bytes)
        .map_err(|e| anyhow!("the ONNX model does not load: {e}"))
}
