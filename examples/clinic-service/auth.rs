//! Who calls: every patient route takes a bearer token, a JWT naming one
//! user (`sub`) of one provider (`provider`), with an expiry (`exp`). The
//! provider of every case read or written is the token's; the user is the
//! accessor of every phi call (`Keyring::on_behalf_of`), so that phi's
//! access log names the person.
//!
//! The tokens are verified with `jsonwebtoken` (on ring): HS256 with a
//! shared secret (`CLINIC_JWT_SECRET`, at least 32 bytes), or RS256 /
//! ES256 with the issuer's public key (`CLINIC_JWT_PUBLIC_KEY_FILE`, PEM,
//! and `--jwt-algorithm`). Only the configured algorithm is accepted (a
//! token signed otherwise, or with `alg: none`, is refused). `exp` and
//! `nbf` are checked with jsonwebtoken's 60-second leeway for clock skew.
//! There is no default: without one of the two the service does not start.
//!
//! A refused request is answered 401 with `WWW-Authenticate: Bearer` before
//! its handler runs: nothing is read from the database, no key is fetched
//! and nothing is opened.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use phi_types::Keyring;
use phi_types::access::Accessor;
use serde::{Deserialize, Serialize};

use crate::App;
use crate::error::ApiError;

/// The shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as
/// long as the hash's output).
pub(crate) const MIN_SECRET_BYTES: usize = 32;

/// The purpose of an access when the token names none.
pub(crate) const DEFAULT_PURPOSE: &str = "treatment";

/// A token's claims.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Claims {
    /// The user: the accessor phi's access log names.
    pub(crate) sub: String,
    /// The one provider whose cases the token reaches.
    pub(crate) provider: String,
    /// Expiry, seconds since the epoch (required).
    pub(crate) exp: u64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) iat: Option<u64>,
    /// The purpose of the accesses made with the token (default
    /// `treatment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) purpose: Option<String>,
    /// Issuer (checked when `--jwt-issuer` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) iss: Option<String>,
    /// Audience (checked when `--jwt-audience` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) aud: Option<String>,
}

/// How tokens are verified.
pub(crate) struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

/// `--jwt-algorithm`: the signature algorithm of a public key's tokens.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum PublicKeyAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (an RSA public key).
    Rs256,
    /// ECDSA on P-256 with SHA-256 (an EC public key).
    Es256,
}

/// Where the verification key comes from (the command line's settings).
#[derive(Debug)]
pub(crate) struct AuthConfig<'a> {
    pub(crate) secret: Option<&'a str>,
    pub(crate) public_key_file: Option<&'a std::path::Path>,
    pub(crate) algorithm: PublicKeyAlgorithm,
    pub(crate) issuer: Option<&'a str>,
    pub(crate) audience: Option<&'a str>,
}

impl Verifier {
    /// The verifier `config` describes; an error naming the setting when
    /// none is given or one is unusable.
    pub(crate) fn new(config: &AuthConfig<'_>) -> crate::Result<Verifier> {
        let (key, algorithm) = match (config.secret, config.public_key_file) {
            (Some(_), Some(_)) => {
                return Err(
                    "CLINIC_JWT_SECRET / --jwt-secret and CLINIC_JWT_PUBLIC_KEY_FILE / \
                     --jwt-public-key-file are both set: give one"
                        .into(),
                );
            }
            (Some(secret), None) => {
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(format!(
                        "CLINIC_JWT_SECRET / --jwt-secret: shorter than {MIN_SECRET_BYTES} bytes \
                         (HS256 needs a secret at least as long as its hash)"
                    )
                    .into());
                }
                (
                    DecodingKey::from_secret(secret.as_bytes()),
                    Algorithm::HS256,
                )
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!(
                        "CLINIC_JWT_PUBLIC_KEY_FILE / --jwt-public-key-file {}: {e}",
                        path.display()
                    )
                })?;
                let (key, algorithm) = match config.algorithm {
                    PublicKeyAlgorithm::Rs256 => {
                        (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256)
                    }
                    PublicKeyAlgorithm::Es256 => (DecodingKey::from_ec_pem(&pem), Algorithm::ES256),
                };
                let key = key.map_err(|e| {
                    format!(
                        "CLINIC_JWT_PUBLIC_KEY_FILE / --jwt-public-key-file {}: not a PEM public \
                         key for {algorithm:?} ({e})",
                        path.display()
                    )
                })?;
                (key, algorithm)
            }
            (None, None) => {
                return Err("no token verification configured: set CLINIC_JWT_SECRET / \
                     --jwt-secret (HS256) or CLINIC_JWT_PUBLIC_KEY_FILE / --jwt-public-key-file \
                     (RS256 or ES256, --jwt-algorithm); the patient routes are never served \
                     without authentication"
                    .into());
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        if let Some(issuer) = config.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        match config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        Ok(Verifier { key, validation })
    }

    /// The claims of a valid `token`, or why it is refused (a reason with
    /// nothing of the token in it).
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, &'static str> {
        use jsonwebtoken::errors::ErrorKind as K;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                K::ExpiredSignature => "the token has expired",
                K::ImmatureSignature => "the token is not valid yet",
                K::InvalidSignature => "the token's signature does not verify",
                K::InvalidAlgorithm => "the token is not signed with the configured algorithm",
                K::InvalidIssuer => "the token's issuer is not the one configured",
                K::InvalidAudience => "the token's audience is not this service",
                K::MissingRequiredClaim(_) => "the token lacks a required claim (exp, sub)",
                K::Json(_) => "the token's claims are not sub, provider and exp",
                _ => "the token is not a valid JWT",
            })?
            .claims;
        if claims.sub.trim().is_empty() {
            return Err("the token's sub (user) is empty");
        }
        if claims.provider.trim().is_empty() {
            return Err("the token's provider is empty");
        }
        Ok(claims)
    }
}

/// A token: HS256 with `config`'s secret, for `user` of `provider`, valid
/// `ttl_seconds` from now, with the configured issuer and audience
/// (`clinic-service token`).
pub(crate) fn mint(
    config: &AuthConfig<'_>,
    user: &str,
    provider: &str,
    purpose: Option<&str>,
    ttl_seconds: u64,
) -> crate::Result<String> {
    let secret = config.secret.ok_or(
        "clinic-service token signs with CLINIC_JWT_SECRET / --jwt-secret (HS256); tokens for \
         a public key are issued by the holder of its private key",
    )?;
    if user.trim().is_empty() || provider.trim().is_empty() {
        return Err("--user and --provider must not be empty".into());
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!("CLINIC_JWT_SECRET: shorter than {MIN_SECRET_BYTES} bytes").into());
    }
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: user.to_owned(),
        provider: provider.to_owned(),
        exp: now.saturating_add(ttl_seconds),
        iat: Some(now),
        purpose: purpose.map(str::to_owned),
        iss: config.issuer.map(str::to_owned),
        aud: config.audience.map(str::to_owned),
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The request's id ([`crate::routes`]' request log sets it).
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub(crate) Arc<str>);

/// An authenticated caller: a user (the keyring's accessor) of one provider, and phi's keyring seen
/// on their behalf for this request.
#[derive(Debug)]
pub(crate) struct Caller {
    /// The provider whose cases the caller reaches.
    pub(crate) provider: String,
    /// The keyring on behalf of the user, with the purpose and request id.
    pub(crate) keyring: Keyring,
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Caller, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer header"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header is not a bearer token")
            })?;
        let verifier = app
            .verifier
            .as_ref()
            .ok_or_else(|| ApiError::unauthorized("token verification is not configured"))?;
        let claims = verifier.verify(token).map_err(ApiError::unauthorized)?;
        tracing::Span::current().record("user", tracing::field::debug(&claims.sub));
        let purpose = claims.purpose.as_deref().unwrap_or(DEFAULT_PURPOSE);
        let mut accessor = Accessor::new(claims.sub, purpose);
        if let Some(RequestId(id)) = parts.extensions.get::<RequestId>() {
            accessor = accessor.with_request_id(id.as_ref());
        }
        Ok(Caller {
            keyring: app.keyring.on_behalf_of(&accessor),
            provider: claims.provider,
        })
    }
}
