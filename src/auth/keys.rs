//! The development key pair the default mode generates and trusts, and the tokens `onkos token`
//! mints with it. Production deployments configure their identity provider's key or JWKS instead.

use super::verify::Claims;
use anyhow::Context;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use sha2::{Digest, Sha256};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PRIVATE_FILE: &str = "dev-ed25519.pem";
const PUBLIC_FILE: &str = "dev-ed25519.pub.pem";

pub struct DevKeys {
    pub kid: String,
    pub public_pem: String,
    private_pem: String,
}

impl std::fmt::Debug for DevKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevKeys")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevKeys {
    /// Reads the pair from `dir`, generating it (private key mode 0600) on first use.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        let private_path = dir.join(PRIVATE_FILE);
        let public_path = dir.join(PUBLIC_FILE);
        if !private_path.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
            let signing = SigningKey::from_bytes(&seed);
            let private_pem = signing.to_pkcs8_pem(LineEnding::LF)?;
            let public_pem = signing.verifying_key().to_public_key_pem(LineEnding::LF)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&private_path)
                .with_context(|| format!("cannot create {}", private_path.display()))?;
            std::io::Write::write_all(&mut file, private_pem.as_bytes())?;
            std::fs::write(&public_path, public_pem)?;
        }
        let private_pem = std::fs::read_to_string(&private_path)?;
        let public_pem = std::fs::read_to_string(&public_path)?;
        let kid = hex::encode(&Sha256::digest(public_pem.trim().as_bytes())[..8]);
        Ok(Self {
            kid,
            public_pem,
            private_pem,
        })
    }

    /// A signed token for `tenant` with `roles`, valid from now for `ttl`.
    pub fn mint(
        &self,
        issuer: &str,
        audience: &str,
        subject: &str,
        tenant: &str,
        roles: &[String],
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = Claims {
            sub: subject.into(),
            iss: issuer.into(),
            aud: audience.into(),
            iat: now,
            nbf: now,
            exp: now + ttl.as_secs(),
            tenant: tenant.into(),
            roles: roles.to_vec(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(encode(
            &header,
            &claims,
            &EncodingKey::from_ed_pem(self.private_pem.as_bytes())?,
        )?)
    }
}
