//! Start-up refuses what would make results untraceable or the service unreachable.

use crate::helpers::{fresh_database, repo_path, test_config};
use onkos::app::Application;
use onkos::db::embedded::EmbeddedPostgres;

fn copy_models(to: &std::path::Path) {
    let from = repo_path("models/breast-fna-malignancy");
    let dest = to.join("breast-fna-malignancy");
    std::fs::create_dir_all(&dest).unwrap();
    for file in ["manifest.json", "model.onnx"] {
        std::fs::copy(from.join(file), dest.join(file)).unwrap();
    }
}

#[tokio::test]
async fn a_model_whose_bytes_differ_from_its_manifest_is_not_served() {
    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    copy_models(models.path());
    let onnx = models.path().join("breast-fna-malignancy/model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&onnx, bytes).unwrap();
    let mut config = test_config(data.path());
    config.models_dir = models.path().to_path_buf();
    let error = Application::with_pool(config, fresh_database().await)
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("sha256"), "{error:#}");
}

#[tokio::test]
async fn a_manifest_naming_an_input_the_graph_lacks_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    copy_models(models.path());
    let path = models.path().join("breast-fna-malignancy/manifest.json");
    let manifest = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"input\": \"features\"", "\"input\": \"pixels\"");
    std::fs::write(&path, manifest).unwrap();
    let mut config = test_config(data.path());
    config.models_dir = models.path().to_path_buf();
    let error = Application::with_pool(config, fresh_database().await)
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("pixels"), "{error:#}");
}

#[tokio::test]
async fn missing_postgres_binaries_are_named_with_the_setting_to_fix() {
    let empty = tempfile::tempdir().unwrap();
    let error = EmbeddedPostgres::start(&empty.path().join("pg"), Some(empty.path()), "postgres")
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("ONKOS_EMBEDDED_PG_BIN"),
        "{error}"
    );
}

/// `cuda` is a requirement, not a wish: where the CUDA execution provider does not register (this
/// CPU build of ONNX Runtime, or no GPU) start-up stops with the reason; where it does, every
/// session runs on it and /readyz says so. `auto` on the same machine falls back to the CPU.
#[tokio::test]
async fn execution_provider_cuda_runs_on_cuda_or_stops_start_up_with_the_reason() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.execution_provider = "cuda".into();
    match Application::with_pool(config, fresh_database().await).await {
        Err(error) => {
            let text = format!("{error:#}");
            assert!(
                text.contains("ONKOS_EXECUTION_PROVIDER=cuda")
                    && text.contains("CUDA execution provider did not register"),
                "{text}"
            );
        }
        Ok(app) => {
            assert_eq!(app.state().registry.provider(), "CUDAExecutionProvider");
        }
    }
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.execution_provider = "auto".into();
    let app = Application::with_pool(config, fresh_database().await)
        .await
        .unwrap();
    assert!(
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
            .contains(&app.state().registry.provider())
    );
}

#[tokio::test]
async fn cuda_libraries_that_cannot_be_preloaded_stop_a_cuda_start_up() {
    let data = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.execution_provider = "cuda".into();
    config.cuda_library_dir = Some(empty.path().to_path_buf());
    let error = Application::with_pool(config, fresh_database().await)
        .await
        .unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains("CUDA libraries cannot be loaded") && text.contains("libcudart"),
        "{text}"
    );
}
