/* stub for pyscf libxc_itrf: no XC functional is evaluated where this is used */
int LIBXC_eval_xc(void){return 0;}
int LIBXC_hybrid_coeff(void){return 0;}
int LIBXC_is_cam_rsh(void){return 0;}
int LIBXC_is_gga(void){return 0;}
int LIBXC_is_hybrid(void){return 0;}
int LIBXC_is_lda(void){return 0;}
int LIBXC_is_meta_gga(void){return 0;}
int LIBXC_is_nlc(void){return 0;}
int LIBXC_max_deriv_order(void){return 0;}
int LIBXC_needs_laplacian(void){return 0;}
int LIBXC_nlc_coeff(void){return 0;}
int LIBXC_rsh_coeff(void){return 0;}
int LIBXC_xc_func_end(void){return 0;}
int LIBXC_xc_func_find_ext_params_name(void){return 0;}
int LIBXC_xc_func_init(void){return 0;}
int LIBXC_xc_func_set_params(void){return 0;}
int LIBXC_xc_func_type_size(void){return 0;}
int LIBXC_xc_reference(void){return 0;}
int LIBXC_xc_type(void){return 0;}
int XCFUN_eval_xc(void){return 0;}
int XCFUN_xc_type(void){return 0;}
int c(void){return 0;}
int so(void){return 0;}
int xc_available_functional_numbers(void){return 0;}
int xc_func_get_info(void){return 0;}
int xc_func_info_get_n_ext_params(void){return 0;}
int xc_func_set_ext_params(void){return 0;}
int xc_func_set_ext_params_name(void){return 0;}
int xc_functional_get_name(void){return 0;}
int xc_functional_get_number(void){return 0;}
int xc_number_of_functionals(void){return 0;}
const char* xc_reference(void){return "stub";}
const char* xc_reference_doi(void){return "stub";}
const char* xc_version_string(void){return "0.0.0-stub";}
int xcfun_describe_long(void){return 0;}
int xcfun_describe_short(void){return 0;}
int xcfun_enumerate_parameters(void){return 0;}
int xcfun_splash(void){return 0;}
int xcfun_version(void){return 0;}
