//! The registration policy: a pure function from a guarded request (route,
//! method, query, body) and the configuration to a decision.
//!
//! No I/O and no clock: the gate reads the body and calls [`Policy::head`],
//! then, where a body is needed, [`Policy::body`]. What comes out is either a
//! refusal or exactly what the homeserver receives — canonical path, a query
//! the gate wrote, and a body the gate re-serialized.

pub mod appservice;
pub(in crate::gate) mod sso;
mod threepid;

use bytes::Bytes;
use http::Method;
use serde_json::{Map, Value};

use super::json::parse_object;
use super::query::{encode_component, Query};
use super::routes::{GuardedRoute, Medium};
use super::username::{UsernamePolicy, UsernameRule};
use appservice::{AccessToken, AppServiceGrant};
use std::net::IpAddr;
use std::sync::Arc;
use threepid::{canonical_email, check_request_token};

use regex::Regex;

use crate::appservice::AppServices;
use crate::client_ip::IpNet;
use crate::config::{Config, DomainGlob, GuestAccess};
use crate::defences::lists::{AddressLists, DomainLists};
use crate::error::MatrixError;

/// The kind of account a `POST …/register` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    /// `kind=user` or no kind at all.
    User {
        /// Whether the client named the kind (forwarded as `kind=user`).
        explicit: bool,
    },
    /// `kind=guest`
    Guest,
}

/// A username a request named: as the client sent it, and as the gate
/// mapped it. The audit log records both, so that an operator can see why a
/// name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedName {
    /// The name as sent.
    pub sent: String,
    /// The localpart after case mapping; `None` when mapping itself refused
    /// the name (`case = "reject"` and upper case).
    pub mapped: Option<String>,
}

/// Why the gate refused a request: the rule, for logs and metrics, and the
/// answer the client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The rule that refused (`registration_disabled`, `guest_denied`, ...).
    pub rule: &'static str,
    /// The Matrix error answered.
    pub error: MatrixError,
    /// The username the refused request named, if the refusal came after
    /// the gate read one (boxed: refusals travel in `Result`s, and most
    /// carry none).
    pub username: Option<Box<RequestedName>>,
    /// The list file whose entry refused the request (`deny_list`,
    /// `email_domain_list`, `denied_asn` by a list of `deny_asn_lists`),
    /// as configured.
    pub list: Option<Arc<str>>,
}

impl Refusal {
    /// A refusal by `rule`, answered with `error`.
    pub fn new(rule: &'static str, error: MatrixError) -> Self {
        Refusal {
            rule,
            error,
            username: None,
            list: None,
        }
    }

    /// A refusal by an entry of the list file `list`.
    pub(crate) fn listed(rule: &'static str, error: MatrixError, list: &Arc<str>) -> Self {
        Refusal {
            list: Some(list.clone()),
            ..Refusal::new(rule, error)
        }
    }
}

impl From<UsernameRule> for Refusal {
    fn from(rule: UsernameRule) -> Self {
        Refusal::new(rule.name(), rule.error())
    }
}

/// What to do once the method, path and query are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadDecision {
    /// Answer with this error; the homeserver sees nothing.
    Refuse(Refusal),
    /// Forward without a body to this path and query.
    Forward(Forward),
    /// Read the body (bounded), then ask [`Policy::body`].
    ReadBody(BodyPlan),
}

/// What the homeserver receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Canonical path and the gate's own query.
    pub path_and_query: String,
    /// The re-serialized JSON body, if the request has one.
    pub body: Option<Bytes>,
    /// The username that was checked and forwarded (mapped), if any.
    pub username: Option<RequestedName>,
    /// The kind of account the request makes: a `POST …/register`'s, or a
    /// user for an SSO username pick; `None` on the other routes.
    pub account: Option<AccountKind>,
    /// For an application service registration: the service, and the
    /// token the homeserver receives as `Authorization: Bearer`.
    pub appservice: Option<AppServiceGrant>,
}

/// How a body is to be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// A registration of the given kind.
    Register(GuardedRoute, AccountKind),
    /// Any other route that takes a JSON object body (requestToken, admin).
    JsonObject(GuardedRoute),
    /// The SSO username picker's form.
    PickUsername,
}

/// The compiled registration policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The username rules.
    pub username: UsernamePolicy,
    enabled: bool,
    guest_access: GuestAccess,
    /// Whether the homeserver upgrades guests (`[homeserver] guest_upgrades`).
    guest_upgrades: bool,
    allow_admin_register: bool,
    /// Largest registration body accepted.
    pub max_body_bytes: usize,
    deny_networks: Vec<IpNet>,
    deny_user_agents: Vec<Regex>,
    email_allowed: Vec<DomainGlob>,
    email_denied: Vec<DomainGlob>,
    deny_lists: AddressLists,
    email_denied_lists: DomainLists,
    app_services: AppServices,
    server_name: String,
}

impl Policy {
    /// Compiles the policy from a validated configuration.
    pub fn new(config: &Config) -> Self {
        Policy {
            username: UsernamePolicy::new(&config.username, &config.homeserver.server_name),
            enabled: config.registration.enabled,
            guest_access: config.guest.access,
            guest_upgrades: config.homeserver.guest_upgrades,
            allow_admin_register: config.registration.allow_admin_register,
            max_body_bytes: config.registration.max_body_bytes,
            deny_networks: config.client_ip.deny.iter().map(|n| n.0).collect(),
            deny_user_agents: config
                .client_ip
                .deny_user_agents
                .iter()
                .map(|p| p.0.clone())
                .collect(),
            email_allowed: config.email.allowed_domains.clone(),
            email_denied: config.email.denied_domains.clone(),
            deny_lists: config.client_ip.deny_lists.clone(),
            email_denied_lists: config.email.denied_domain_lists.clone(),
            app_services: config.homeserver.app_services.clone(),
            server_name: config.homeserver.server_name.clone(),
        }
    }

    /// Refuses banned clients: a denied network, an address in a deny
    /// list, or a denied user agent.
    pub fn client(&self, client: Option<IpAddr>, user_agent: Option<&str>) -> Result<(), Refusal> {
        if let Some(ip) = client {
            let forbidden =
                || MatrixError::forbidden("Registration is not available from your network.");
            if self.deny_networks.iter().any(|net| net.contains(ip)) {
                return Err(Refusal::new("denied_client", forbidden()));
            }
            if let Some(list) = self.deny_lists.find(ip) {
                return Err(Refusal::listed("deny_list", forbidden(), list));
            }
        }
        if !self.deny_user_agents.is_empty() {
            let agent = user_agent.unwrap_or("");
            if self.deny_user_agents.iter().any(|p| p.is_match(agent)) {
                return Err(Refusal::new(
                    "denied_user_agent",
                    MatrixError::forbidden("Registration is not available to this client."),
                ));
            }
        }
        Ok(())
    }

    /// Applies `[email]` domain rules to an email `requestToken` body, on
    /// the address the homeserver will mail ([`canonical_email`]), and puts
    /// that address into the body the homeserver receives.
    fn email(&self, object: &mut Map<String, Value>) -> Result<(), Refusal> {
        if self.email_allowed.is_empty()
            && self.email_denied.is_empty()
            && self.email_denied_lists.is_empty()
        {
            return Ok(());
        }
        let Some(Value::String(address)) = object.get("email") else {
            return Err(Refusal::new(
                "bad_json",
                MatrixError::bad_json("email must be a string."),
            ));
        };
        let canonical = canonical_email(address)?;
        let domain = canonical.domain().trim_end_matches('.');
        let threepid_denied = || {
            MatrixError::threepid_denied("Third party identifier is not allowed on this server.")
        };
        let denied = || Err(Refusal::new("email_domain", threepid_denied()));
        if domain.is_empty() || self.email_denied.iter().any(|g| g.matches(domain)) {
            return denied();
        }
        if let Some(list) = self.email_denied_lists.find(domain) {
            return Err(Refusal::listed(
                "email_domain_list",
                threepid_denied(),
                list,
            ));
        }
        if !self.email_allowed.is_empty() && !self.email_allowed.iter().any(|g| g.matches(domain)) {
            return denied();
        }
        object.insert("email".to_owned(), Value::String(canonical.address));
        Ok(())
    }

    /// Checks a requested username; the refusal, too, names it.
    fn username_decision(
        &self,
        requested: &str,
        guest_upgrade: bool,
    ) -> Result<RequestedName, Refusal> {
        let (mapped, verdict) = self.username.judge(requested, guest_upgrade);
        let name = RequestedName {
            sent: requested.to_owned(),
            mapped,
        };
        match verdict {
            Ok(()) => Ok(name),
            Err(rule) => Err(Refusal {
                username: Some(Box::new(name)),
                ..rule.into()
            }),
        }
    }

    /// Decides on a guarded request from its method, route and raw query.
    pub fn head(
        &self,
        method: &Method,
        route: GuardedRoute,
        raw_query: Option<&str>,
    ) -> HeadDecision {
        use GuardedRoute::*;
        let unknown = || refuse("unknown_route", MatrixError::not_found());
        if route == Unknown {
            return unknown();
        }
        if route == AdminRegister && !self.allow_admin_register {
            return refuse(
                "admin_register",
                MatrixError::forbidden("Shared-secret registration is not available here."),
            );
        }
        let path = route.canonical_path();
        // CORS preflights carry no body and register nothing.
        if method == Method::OPTIONS {
            return HeadDecision::Forward(Forward {
                path_and_query: path.into_owned(),
                body: None,
                username: None,
                account: None,
                appservice: None,
            });
        }
        let expected = match route {
            Register(_) | RequestToken(..) => Method::POST,
            Available(_) | TokenValidity(_) | PickUsernameCheck => Method::GET,
            AdminRegister | PickUsername if method == Method::GET => Method::GET,
            AdminRegister | PickUsername => Method::POST,
            Unknown => return unknown(),
        };
        if *method != expected {
            let allow = match route {
                Available(_) | TokenValidity(_) | PickUsernameCheck => "GET, OPTIONS",
                AdminRegister | PickUsername => "GET, POST, OPTIONS",
                _ => "POST, OPTIONS",
            };
            return refuse("method", MatrixError::method_not_allowed(allow));
        }
        if !self.enabled && route != AdminRegister {
            return refuse(
                "registration_disabled",
                MatrixError::forbidden("Registration has been disabled."),
            );
        }
        let query = Query::parse(raw_query);
        match route {
            Register(_) => {
                let kind = match query.single("kind") {
                    Ok(None) => AccountKind::User { explicit: false },
                    Ok(Some("user")) => AccountKind::User { explicit: true },
                    Ok(Some("guest")) => AccountKind::Guest,
                    Ok(Some(other)) => {
                        return refuse(
                            "unknown_kind",
                            MatrixError::unrecognized(format!(
                                "Unknown account kind {other:?}: expected \"user\" or \"guest\"."
                            )),
                        )
                    }
                    Err(n) => {
                        return refuse(
                            "ambiguous_kind",
                            MatrixError::unrecognized(format!(
                                "The kind parameter is given {n} times; give it once."
                            )),
                        )
                    }
                };
                if kind == AccountKind::Guest && self.guest_access == GuestAccess::Deny {
                    return refuse(
                        "guest_denied",
                        MatrixError::forbidden("Guest access is disabled."),
                    );
                }
                HeadDecision::ReadBody(BodyPlan::Register(route, kind))
            }
            Available(_) => {
                let name = match query.single("username") {
                    Ok(Some(name)) => name,
                    Ok(None) => {
                        return refuse(
                            "missing_param",
                            MatrixError::missing_param("Missing username parameter."),
                        )
                    }
                    Err(n) => {
                        return refuse(
                            "ambiguous_param",
                            MatrixError::invalid_param(format!(
                                "The username parameter is given {n} times; give it once."
                            )),
                        )
                    }
                };
                match self.username_decision(name, false) {
                    Ok(checked) => HeadDecision::Forward(Forward {
                        path_and_query: format!(
                            "{path}?username={}",
                            encode_component(checked.mapped.as_deref().unwrap_or_default())
                        ),
                        body: None,
                        username: Some(checked),
                        account: None,
                        appservice: None,
                    }),
                    Err(refusal) => HeadDecision::Refuse(refusal),
                }
            }
            TokenValidity(_) => match query.single("token") {
                Ok(Some(token)) => HeadDecision::Forward(Forward {
                    path_and_query: format!("{path}?token={}", encode_component(token)),
                    body: None,
                    username: None,
                    account: None,
                    appservice: None,
                }),
                Ok(None) => refuse(
                    "missing_param",
                    MatrixError::missing_param("Missing token parameter."),
                ),
                Err(n) => refuse(
                    "ambiguous_param",
                    MatrixError::invalid_param(format!(
                        "The token parameter is given {n} times; give it once."
                    )),
                ),
            },
            PickUsernameCheck => sso::check(self, raw_query),
            // The form itself: its query is not read, and not forwarded.
            PickUsername if expected == Method::GET => HeadDecision::Forward(Forward {
                path_and_query: path.into_owned(),
                body: None,
                username: None,
                account: None,
                appservice: None,
            }),
            PickUsername => HeadDecision::ReadBody(BodyPlan::PickUsername),
            AdminRegister if expected == Method::GET => HeadDecision::Forward(Forward {
                path_and_query: path.into_owned(),
                body: None,
                username: None,
                account: None,
                appservice: None,
            }),
            RequestToken(..) | AdminRegister => HeadDecision::ReadBody(BodyPlan::JsonObject(route)),
            Unknown => unknown(),
        }
    }

    /// Decides on the body of a request [`Policy::head`] asked to read,
    /// which carried no access token.
    pub fn body(&self, plan: BodyPlan, body: &[u8]) -> Result<Forward, Refusal> {
        self.body_with(plan, body, None)
    }

    /// [`Policy::body`] for a request that carried `token`
    /// ([`appservice::registration_token`]): an application service
    /// registration needs it, any other user registration is refused with
    /// it.
    pub fn body_with(
        &self,
        plan: BodyPlan,
        body: &[u8],
        token: Option<&AccessToken>,
    ) -> Result<Forward, Refusal> {
        if plan == BodyPlan::PickUsername {
            return sso::pick(self, body);
        }
        let object = parse_object(body).map_err(|e| {
            let rule = if e.errcode == "M_NOT_JSON" {
                "not_json"
            } else {
                "bad_json"
            };
            Refusal::new(rule, e)
        })?;
        match plan {
            BodyPlan::JsonObject(route) => {
                let mut object = object;
                if let GuardedRoute::RequestToken(_, medium) = route {
                    check_request_token(medium, &object)?;
                    if medium == Medium::Email {
                        self.email(&mut object)?;
                    }
                }
                Ok(Forward {
                    path_and_query: route.canonical_path().into_owned(),
                    body: Some(serialize(&object)),
                    username: None,
                    account: None,
                    appservice: None,
                })
            }
            BodyPlan::Register(route, AccountKind::Guest) => {
                let mut guest = Map::new();
                match object.get("initial_device_display_name") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(name)) => {
                        guest.insert(
                            "initial_device_display_name".to_owned(),
                            Value::String(name.clone()),
                        );
                    }
                    Some(_) => {
                        return Err(Refusal::new(
                            "bad_json",
                            MatrixError::bad_json("initial_device_display_name must be a string."),
                        ))
                    }
                }
                Ok(Forward {
                    path_and_query: format!("{}?kind=guest", route.canonical_path()),
                    body: Some(serialize(&guest)),
                    username: None,
                    account: Some(AccountKind::Guest),
                    appservice: None,
                })
            }
            BodyPlan::Register(route, AccountKind::User { explicit }) => {
                let mut object = object;
                let path = route.canonical_path();
                let path_and_query = if explicit {
                    format!("{path}?kind=user")
                } else {
                    path.into_owned()
                };
                if appservice::is_app_service_body(&object) {
                    let (name, grant) = appservice::decide(
                        &self.app_services,
                        &self.server_name,
                        &mut object,
                        token,
                    )?;
                    return Ok(Forward {
                        path_and_query,
                        body: Some(serialize(&object)),
                        username: Some(RequestedName {
                            sent: name.clone(),
                            mapped: Some(name),
                        }),
                        account: Some(AccountKind::User { explicit }),
                        appservice: Some(grant),
                    });
                }
                if token.is_some() {
                    return Err(appservice::token_on_user_registration());
                }
                // Synapse treats a null token as no token (`is None`), so
                // only a non-empty string token makes this a guest upgrade.
                // And only where one is real: while guests are allowed (with
                // guests denied no guest account can exist to upgrade, when
                // the gate is the only way in) and in front of a homeserver
                // that upgrades guests (Dendrite and Conduit ignore the
                // token, and Conduit would register the all-digit name).
                let guest_upgrade = self.guest_upgrades
                    && self.guest_access == GuestAccess::Allow
                    && matches!(
                        object.get("guest_access_token"),
                        Some(Value::String(token)) if !token.is_empty()
                    );
                let username = match object.get("username") {
                    None => None,
                    Some(Value::String(requested)) => {
                        let checked = self.username_decision(requested, guest_upgrade)?;
                        let mapped = checked.mapped.clone().unwrap_or_default();
                        object.insert("username".to_owned(), Value::String(mapped));
                        Some(checked)
                    }
                    Some(_) => return Err(UsernameRule::NotAString.into()),
                };
                Ok(Forward {
                    path_and_query,
                    body: Some(serialize(&object)),
                    username,
                    account: Some(AccountKind::User { explicit }),
                    appservice: None,
                })
            }
            BodyPlan::PickUsername => sso::pick(self, body),
        }
    }
}

/// The account kind a `POST …/register` asks for, as the audit log names
/// it: `guest` when any `kind` value says so (however the homeserver would
/// read several), else `user`. Decisions use [`Policy::head`], which refuses
/// ambiguous and unknown kinds.
pub fn audited_kind(raw_query: Option<&str>) -> &'static str {
    if Query::parse(raw_query).values("kind").any(|v| v == "guest") {
        "guest"
    } else {
        "user"
    }
}

fn refuse(rule: &'static str, error: MatrixError) -> HeadDecision {
    HeadDecision::Refuse(Refusal::new(rule, error))
}

fn serialize(object: &Map<String, Value>) -> Bytes {
    // Serializing a `Map` of `Value`s cannot fail: every key is a string.
    Bytes::from(serde_json::to_vec(object).unwrap_or_else(|_| b"{}".to_vec()))
}

#[cfg(test)]
mod tests;
