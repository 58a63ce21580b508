//! All SQL. Every function takes an executor and, for tenant-owned rows, the tenant.

pub mod analyses;
pub mod audit;
pub mod embeddings;
pub mod idempotency;
pub mod jobs;
pub mod models;
pub mod provenance;
pub mod slides;
pub mod webhooks;

/// The channel the API notifies when it queues work; workers LISTEN on it.
pub const JOBS_CHANNEL: &str = "onkos_jobs";
/// The channel workers notify, with a comma-separated list of analysis ids, when analyses reach a
/// final state; long polls wait on it.
pub const DONE_CHANNEL: &str = "onkos_done";

/// A JSON document bound as Postgres `json`, not `jsonb`: the server validates the text and stores
/// it as written, where `jsonb` would parse every number into a numeric and re-encode the whole
/// document (migration 0011). sqlx's `Json` always declares `jsonb`, so a `json` column written
/// through it pays for that parse and then for a cast back to text.
#[derive(Debug)]
pub struct JsonText<T>(pub T);

/// The built-in type ids of `json` and `json[]` (fixed in every Postgres's catalogue).
const JSON_OID: sqlx::postgres::types::Oid = sqlx::postgres::types::Oid(114);
const JSON_ARRAY_OID: sqlx::postgres::types::Oid = sqlx::postgres::types::Oid(199);

impl<T> sqlx::Type<sqlx::Postgres> for JsonText<T> {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(JSON_OID)
    }
}

impl<T> sqlx::postgres::PgHasArrayType for JsonText<T> {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_oid(JSON_ARRAY_OID)
    }
}

impl<T: serde::Serialize> sqlx::Encode<'_, sqlx::Postgres> for JsonText<T> {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        // The binary form of `json` is its text.
        serde_json::to_writer(&mut **buf, &self.0)?;
        Ok(sqlx::encode::IsNull::No)
    }
}
