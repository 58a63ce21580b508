//! ONNX Runtime: one environment per process, one session per model, execution provider chosen at
//! load (CUDA when the runtime and the machine have it, else CPU). Calls here block: callers run
//! them on the blocking pool, never on the async runtime.

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

/// Which execution provider runs a session, as ONNX Runtime names it.
pub type Provider = &'static str;
pub const CPU: Provider = "CPUExecutionProvider";
pub const CUDA: Provider = "CUDAExecutionProvider";

/// How sessions are built: the process's environment, whether to try CUDA, intra-op threads.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub env: Environment,
    pub try_cuda: bool,
    pub threads: usize,
}

/// One loaded ONNX graph with a float matrix input and a float matrix output.
#[derive(Debug)]
pub struct OnnxModel {
    // ort sessions take `&mut self` to run; requests for one model are batched upstream, so one
    // lock per model costs nothing and keeps the session's memory arena warm.
    session: Mutex<Session>,
    input: String,
    output: String,
    width: usize,
    pub provider: Provider,
}

impl OnnxModel {
    /// Builds a session from ONNX bytes, checking that `input` and `output` exist in the graph.
    pub fn load(
        bytes: &[u8],
        input: &str,
        output: &str,
        width: usize,
        options: &SessionOptions,
    ) -> anyhow::Result<Self> {
        let env = &options.env;
        let threads = options.threads;
        let (session, provider) = match options
            .try_cuda
            .then(|| build_session(env, bytes, threads, true))
        {
            Some(Ok(session)) => (session, CUDA),
            Some(Err(e)) => {
                tracing::info!(reason = %e, "CUDA execution provider unavailable, using CPU");
                (build_session(env, bytes, threads, false)?, CPU)
            }
            None => (build_session(env, bytes, threads, false)?, CPU),
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
            inputs.iter().any(|n| n == input),
            "the graph has no input {input:?} (it has {inputs:?})"
        );
        anyhow::ensure!(
            outputs.iter().any(|n| n == output),
            "the graph has no output {output:?} (it has {outputs:?})"
        );
        Ok(Self {
            session: Mutex::new(session),
            input: input.into(),
            output: output.into(),
            width,
            provider,
        })
    }

    /// Runs `rows` (row-major, `width` values each) and returns the output rows.
    pub fn predict(&self, rows: &[f32]) -> anyhow::Result<Vec<Vec<f32>>> {
        anyhow::ensure!(
            !rows.is_empty() && rows.len().is_multiple_of(self.width),
            "a batch of {} values is not a whole number of rows of {}",
            rows.len(),
            self.width
        );
        let n = rows.len() / self.width;
        let mut session = self
            .session
            .lock()
            .map_err(|_| anyhow!("an earlier inference panicked"))?;
        let tensor = TensorRef::from_array_view(([n, self.width], rows))?;
        let outputs = session.run(ort::inputs![self.input.as_str() => tensor])?;
        let (shape, values) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
        let per_row = shape.get(1).copied().unwrap_or(1);
        let per_row = usize::try_from(per_row).context("negative output dimension")?;
        anyhow::ensure!(
            values.len() == n * per_row,
            "output shape {shape:?} does not match {n} rows"
        );
        Ok(values.chunks(per_row).map(<[f32]>::to_vec).collect())
    }
}

fn build_session(
    env: &Environment,
    bytes: &[u8],
    threads: usize,
    cuda: bool,
) -> anyhow::Result<Session> {
    let builder = Session::builder(env)?
        .with_intra_threads(threads)
        .map_err(|e| anyhow!("{e}"))?;
    let mut builder = if cuda {
        builder
            .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| anyhow!("{e}"))?
    } else {
        builder
    };
    builder
        .commit_from_memory(bytes)
        .map_err(|e| anyhow!("the ONNX model does not load: {e}"))
}
