"""Device profiles (data files in targets/profiles/) and one backend module per compiler (targets/backends/)."""
from edgesmith.targets.profile import Profile, ProfileError, list_profiles, load_profile

__all__ = ["Profile", "ProfileError", "list_profiles", "load_profile"]
