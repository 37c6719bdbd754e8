//! Compile-time checks that every shared type has the size both sides expect and no implicit
//! padding (a padding byte would make equal keys hash differently).

use core::mem::size_of;

use crate::{
    affinity::*, backend::*, config::*, ct::*, dsr::*, event::*, info::*, maglev::*, revnat::*,
    service::*,
};

const _: () = {
    assert!(size_of::<Service4Key>() == 8);
    assert!(size_of::<Service6Key>() == 20);
    assert!(size_of::<ServiceValue>() == 20);
    assert!(size_of::<SlotKey>() == 8);
    assert!(size_of::<SlotChunk>() == 64);
    assert!(size_of::<MemberKey>() == 8);
    assert!(size_of::<MemberValue>() == 4);
    assert!(size_of::<BackendValue>() == 24);
    assert!(size_of::<AffinityKey>() == 24);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<SockRevNat4Key>() == 16);
    assert!(size_of::<SockRevNat4Value>() == 12);
    assert!(size_of::<SockRevNat6Key>() == 32);
    assert!(size_of::<SockRevNat6Value>() == 24);
    assert!(size_of::<DgramFlowKey>() == 16);
    assert!(size_of::<DgramFlowValue>() == 16);
    assert!(size_of::<ServiceInfo>() == 256);
    assert!(size_of::<AgentState>() == 64);
    assert!(size_of::<IfaceInfo>() == 56);
    assert!(size_of::<crate::info::NamespaceInfo>() == 72);
    assert!(size_of::<ConfigValue>() == 16);
    assert!(size_of::<DsrBudget>() == 16);
    assert!(size_of::<Ct4Key>() == 16);
    assert!(size_of::<MaglevKey>() == 8);
    assert!(size_of::<SockConn>() == 28);
    assert!(size_of::<MaglevChunk>() == 1024);
    assert!(size_of::<Ct4Value>() == 40);
    assert!(size_of::<Ct6Key>() == 40);
    assert!(size_of::<Ct6Value>() == 64);
    assert!(size_of::<NetnsSource>() == 24);
    assert!(size_of::<Event>() == 80);
    assert!(size_of::<Frag4Key>() == 12);
    assert!(size_of::<Frag6Key>() == 40);
    assert!(size_of::<FragPorts>() == 4);
};
